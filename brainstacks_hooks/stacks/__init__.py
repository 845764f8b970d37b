"""MoE-LoRA stacks attached by forward hooks."""

from .brainstacks import BrainStacks
from .config import StackConfig
from .modes import Mode
from .moe_lora import MoELoRA
from .serialization import load_stack, read_stack_metadata, save_stack
from .stack import Stack

__all__ = ["BrainStacks", "MoELoRA", "Mode", "Stack", "StackConfig", "load_stack", "read_stack_metadata", "save_stack"]
