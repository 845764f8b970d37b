"""The completion loss (``brainstacks_hooks.loss``): per-token NLL of the completion tokens only, and the per-row
sums built from it, checked against a plain cross-entropy computed by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainstacks_hooks.loss import completion_token_nll, token_nll


def test_per_token_nll_covers_only_labelled_tokens_and_sums_to_token_nll():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100],  # prompt, three answer tokens, padding
                           [-100, 7, 8, -100, -100, -100]])
    nll, rows = completion_token_nll(logits, labels)
    # token t is predicted at position t - 1
    expected = [F.cross_entropy(logits[b, t - 1][None], labels[b, t][None]).item()
                for b in range(2) for t in range(1, 6) if labels[b, t] != -100]
    assert rows.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(nll, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    sums, counts = token_nll(logits, labels)
    assert counts.tolist() == [3, 2]
    torch.testing.assert_close(sums, torch.tensor([sum(expected[:3]), sum(expected[3:])], dtype=torch.float64))
