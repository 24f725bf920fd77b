"""Shared building blocks: padding must never change what real items get."""

from __future__ import annotations

import itertools

import pytest
import torch

from itmatch.models.layers import CrossAttentionConfig, attention_weights


@pytest.mark.parametrize(
    "normalization, over, activation",
    list(itertools.product(["l2", "l1", "softmax", "none"], ["queries", "keys"], ["leaky_relu", "relu", "none"])),
)
def test_padding_words_change_no_weight(normalization, over, activation):
    config = CrossAttentionConfig(activation=activation, normalization=normalization, normalize_over=over)
    generator = torch.Generator().manual_seed(0)
    regions, words = torch.randn(5, 8, generator=generator), torch.randn(4, 8, generator=generator)
    padded_words = torch.cat([words, torch.zeros(3, 8)])  # padding embeddings are zero
    mask = torch.arange(7) < 4

    # words as queries attending to regions
    exact = attention_weights(words @ regions.T, config)
    padded = attention_weights(padded_words @ regions.T, config, query_mask=mask[:, None])
    torch.testing.assert_close(padded[:4], exact)

    # regions as queries attending to words
    exact = attention_weights(regions @ words.T, config)
    padded = attention_weights(regions @ padded_words.T, config, key_mask=mask[None, :])
    torch.testing.assert_close(padded[:, :4], exact)
    assert padded[:, 4:].abs().max() == 0


def test_precomposed_reasoning_equals_the_plain_form_and_node_zero_alone():
    from itmatch.models.layers import GraphReasoning

    torch.manual_seed(0)
    layer = GraphReasoning(16)
    nodes = torch.randn(6, 9, 16)
    mask = torch.arange(9)[None] < torch.tensor([9, 5, 3, 9, 1, 7])[:, None]
    plain = layer(nodes, mask)  # gradients enabled: the plain (query, key) form
    with torch.no_grad():
        precomposed = layer(nodes, mask)
        first = layer(nodes, mask, first_only=True)
    torch.testing.assert_close(precomposed, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, plain.detach()[:, :1], atol=1e-5, rtol=1e-5)

    # The precomposed weights are cached; an in-place update (an optimizer step) must renew them.
    with torch.no_grad():
        layer.query.weight.add_(0.5)
        updated = layer(nodes, mask)
    torch.testing.assert_close(updated, layer(nodes, mask).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(updated, precomposed)
