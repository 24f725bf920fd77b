"""TIMAM and the shared CMPM and identity terms: the losses equal their formulas written as loops,
each optimizer's step moves only its own parameters, any embedding model trains with the shared
terms, and short training learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pooled_training import CHANCE_RSUM, make_scenes, train_briefly

from itmatch import build_run_config
from itmatch.config import LossConfig
from itmatch.data.precomp import PrecompSplit
from itmatch.errors import ConfigError
from itmatch.evaluation.runner import evaluate_split
from itmatch.losses import IdentityClassifier, TrainingContext, cmpm_loss, identity_loss
from itmatch.models.registry import build_model


def brute_force_cmpm(images, texts, labels, epsilon=1e-8) -> float:
    """L_i2t + L_t2i of the CMPM paper, one item and one candidate at a time."""
    n, total = len(labels), 0.0
    for source, other in ((images, texts), (texts, images)):
        for i in range(n):
            projections = [float(source[i] @ other[j]) / float(other[j].norm()) for j in range(n)]
            peak = max(projections)
            exps = [math.exp(v - peak) for v in projections]
            positives = sum(labels[i] == labels[j] for j in range(n))
            for j in range(n):
                p = exps[j] / sum(exps)
                q = (labels[i] == labels[j]) / positives
                total += p * math.log(epsilon + p / (q + epsilon)) / n
    return total


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), n_labels=st.integers(1, 4))
def test_cmpm_equals_a_loop(n, seed, n_labels):
    generator = torch.Generator().manual_seed(seed)
    images = 3 * torch.randn(n, 5, generator=generator, dtype=torch.float64)
    texts = 3 * torch.randn(n, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, n_labels, (n,), generator=generator)
    expected = brute_force_cmpm(images, texts, labels.tolist())
    assert cmpm_loss(images, texts, labels).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_identity_loss_is_the_norm_softmax_cross_entropy_of_both_modalities():
    torch.manual_seed(0)
    classifier = IdentityClassifier(4, 3, bias=True).double()
    with torch.no_grad():
        classifier.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    images, texts = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 1, 0])
    expected, weights = 0.0, classifier.weight.detach()
    for vectors in (images, texts):
        for x, label in zip(vectors, labels.tolist(), strict=True):
            logits = [float(w @ x / w.norm() + b) for w, b in zip(weights, classifier.bias.detach(), strict=True)]
            expected += (math.log(sum(math.exp(v) for v in logits)) - logits[label]) / len(labels)
    assert identity_loss(classifier, images, texts, labels).item() == pytest.approx(expected, rel=1e-9)


SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 16, "discriminator_hidden": 8, "text": {"word_dim": 8}}


def timam(loss: dict | None = None):
    torch.manual_seed(0)
    config = build_run_config("timam", {"model": SIZES, "loss": {"identity_classes": 4} | (loss or {})})
    return build_model(config), config


def batch(n_images=4, per_image=2):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (n_images * per_image,), generator=generator)
    tokens = torch.randint(4, 30, (len(lengths), 9), generator=generator) * (torch.arange(9) < lengths[:, None])
    features = torch.randn(n_images, 6, 20, generator=generator).repeat_interleave(per_image, 0)
    return {"features": features, "tokens": tokens, "lengths": lengths, "image_index": torch.arange(len(lengths)) // 2}


def moved(model, step) -> set[str]:
    """Names of the parameters that `step()` changes."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step()
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}


def test_each_optimizer_moves_only_its_own_parameters():
    model, config = timam()
    context = TrainingContext(config.loss)
    main = torch.optim.Adam([p for group in model.parameter_groups() for p in group["params"]], lr=1e-2)
    adversary = torch.optim.Adam(model.adversary_parameters(), lr=1e-2)
    data = batch()

    def descend(optimizer, adversarial):
        model.zero_grad(set_to_none=True)
        terms = model(data, context, adversary=adversarial)
        sum(terms.values()).backward()
        optimizer.step()
        return terms

    terms = descend(main, False)
    assert set(terms) == {"identity", "cmpm", "adversarial"}
    encoders = moved(model, lambda: descend(main, False))
    discriminator = moved(model, lambda: descend(adversary, True))
    assert discriminator == {name for name, _ in model.named_parameters() if name.startswith("discriminator.")}
    assert encoders and not encoders & discriminator
    assert {"image_fc.weight", "text_fc.weight", "loss_heads.identity.weight"} <= encoders
    with torch.no_grad():  # the encoders' gradient only reaches the discriminator, never steps it
        assert all(p.grad is None for p in model.text_encoder.parameters())


def test_the_encoders_fool_the_discriminator_and_it_learns_back():
    model, config = timam()
    context = TrainingContext(config.loss)
    data = batch()
    encoders = torch.optim.Adam([p for group in model.parameter_groups() for p in group["params"]], lr=1e-2)
    discriminator = torch.optim.Adam(model.adversary_parameters(), lr=1e-2)

    def discriminator_loss():
        with torch.no_grad():
            return model(data, context, adversary=True)["discriminator"].item()

    for optimizer, key, sign in ((discriminator, "discriminator", -1), (encoders, "adversarial", 1)):
        start = discriminator_loss()
        for _ in range(10):
            model.zero_grad(set_to_none=True)
            model(data, context, adversary=optimizer is discriminator)[key].backward()
            optimizer.step()
        assert sign * (discriminator_loss() - start) > 0, key


def test_cosine_scores_and_unnormalised_vectors_for_the_losses():
    model, _ = timam()
    data = batch()
    with torch.no_grad():
        images, texts = model.encode_image_batch(data), model.encode_text_batch(data)
    assert images["vector"].shape == texts["vector"].shape == (8, 16)
    torch.testing.assert_close(images["vector"].norm(dim=1), torch.ones(8))
    torch.testing.assert_close(torch.nn.functional.normalize(images["unnormalized"], dim=1), images["vector"])


def test_any_embedding_model_takes_the_shared_terms_and_a_cross_attention_model_refuses():
    loss = {"terms": ["triplet", "cmpm", "identity"], "identity_classes": 4}
    config = build_run_config("vsepp", {"model": {"vocab_size": 30, "img_dim": 20, "embed_size": 16}, "loss": loss})
    model = build_model(config)
    terms = model(batch(), TrainingContext(config.loss))
    assert set(terms) == {"triplet", "cmpm", "identity"} and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(ConfigError, match="need one vector per item"):
        build_model(build_run_config("dvsa", {"model": {"vocab_size": 30, "img_dim": 20}, "loss": loss}))
    with pytest.raises(ConfigError, match="loss.terms"):
        LossConfig(terms=["cmpm", "angular"])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_scenes(tmp_path_factory.mktemp("scenes"))


def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path):
    model, state = train_briefly("timam", scenes, tmp_path, {"model": {"discriminator_hidden": 32}})
    assert {"identity", "cmpm", "adversarial", "discriminator"} <= set(state.history[-1])
    assert model.run_config.loss.identity_classes == 300
    metrics = evaluate_split(model, PrecompSplit(scenes, "test"), progress=False)
    # 1.5 times chance (125 measured): CMPM and the identity loss on a pooled embedding learn these
    # scenes more slowly than a triplet loss does.
    assert metrics["rsum"] > 1.5 * CHANCE_RSUM, metrics
