"""Post-hoc similarity stages: formulas against brute force, gallery-permutation invariance, no
stage reading the ground truth, fusion, and the options of evaluate_split and batch retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from itmatch.errors import InputError
from itmatch.evaluation.metrics import retrieval_metrics
from itmatch.evaluation.posthoc import (
    AmfSettings,
    PostHoc,
    Views,
    _rerank_queries,
    amf_fuse,
    csls,
    inverted_softmax,
    mean_fuse,
    ranks,
    reciprocal_rerank,
)

PER_IMAGE = 5


def noisy_scores(n_images: int = 12, seed: int = 0, noise: float = 0.8) -> torch.Tensor:
    """A score matrix whose diagonal blocks (each image's 5 captions) are higher on average."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.eye(n_images, dtype=torch.float64).repeat_interleave(PER_IMAGE, dim=1)
    return truth + noise * torch.randn(n_images, n_images * PER_IMAGE, generator=generator, dtype=torch.float64)


def brute_force_csls(sims: torch.Tensor, k: int) -> torch.Tensor:
    n_images, n_captions = sims.shape
    out = torch.empty_like(sims)
    for i in range(n_images):
        image_density = sorted(sims[i].tolist(), reverse=True)[: min(k, n_captions)]
        for c in range(n_captions):
            caption_density = sorted(sims[:, c].tolist(), reverse=True)[: min(k, n_images)]
            out[i, c] = 2 * sims[i, c] - np.mean(image_density) - np.mean(caption_density)
    return out


def test_inverted_softmax_normalises_each_gallery_item_over_the_queries():
    sims = noisy_scores(4)
    views = inverted_softmax(Views.of(sims), 0.1)
    for caption in range(sims.shape[1]):  # captions are the i2t gallery: normalised over the images
        column = torch.exp(sims[:, caption] / 0.1)
        np.testing.assert_allclose(views.i2t[:, caption], column / column.sum())
    for image in range(4):  # images are the t2i gallery: normalised over the captions
        row = torch.exp(sims[image] / 0.1)
        np.testing.assert_allclose(views.t2i[image], row / row.sum())


def test_inverted_softmax_tames_a_hub():
    """Image 0 outscores every other image on every caption (a hub): plain t2i R@1 is 1 in 4;
    normalising each image over the captions restores the right image for every caption."""
    sims = torch.eye(4).repeat_interleave(PER_IMAGE, dim=1) * 0.5
    sims[0] += 0.6
    views = inverted_softmax(Views.of(sims), 0.05)
    inverted = retrieval_metrics(views.i2t.numpy(), t2i_sims=views.t2i.numpy())
    assert retrieval_metrics(sims.numpy())["t2i"]["r1"] == 25.0 and inverted["t2i"]["r1"] == 100.0


@pytest.mark.parametrize("k", [1, 3, 10, 1000])
def test_csls_matches_the_formula(k):
    sims = noisy_scores(6, seed=k)
    views = csls(Views.of(sims), k)
    expected = brute_force_csls(sims, k)
    np.testing.assert_allclose(views.i2t, expected)
    np.testing.assert_allclose(views.t2i, expected)


def test_csls_tames_a_hub():
    sims = torch.eye(4).repeat_interleave(PER_IMAGE, dim=1) * 0.5
    sims[0] += 0.6
    views = csls(Views.of(sims), 3)
    assert retrieval_metrics(views.i2t.numpy(), t2i_sims=views.t2i.numpy())["t2i"]["r1"] == 100.0


def test_ranks_are_the_stable_sort_positions():
    sims = torch.tensor([[0.5, 0.9, 0.5], [0.1, 0.9, 0.7]], dtype=torch.float64)
    assert ranks(sims, dim=1).tolist() == [[1, 0, 2], [2, 0, 1]]
    assert ranks(sims, dim=0).tolist() == [[0, 0, 1], [1, 1, 0]]


def brute_force_reciprocal(sims: torch.Tensor, k: int) -> torch.Tensor:
    """The i2t view: each image's top k captions sorted by (image's rank among the caption's
    images, forward position), pushed above the rest in that order."""
    out = sims.clone()
    for i in range(sims.shape[0]):
        forward = sorted(range(sims.shape[1]), key=lambda c: -sims[i, c].item())[:k]

        back_rank = {c: sorted(range(sims.shape[0]), key=lambda j, c=c: -sims[j, c].item()).index(i) for c in forward}
        new_order = sorted(forward, key=lambda c: (back_rank[c], forward.index(c)))
        for position, c in enumerate(new_order):
            out[i, c] = sims[i].max() + k - position
    return out


@pytest.mark.parametrize("k", [1, 4, 100])
def test_reciprocal_rerank_matches_brute_force(k):
    sims = noisy_scores(5, seed=k)
    views = reciprocal_rerank(Views.of(sims), k)
    np.testing.assert_allclose(views.i2t, brute_force_reciprocal(sims, min(k, sims.shape[1])))
    np.testing.assert_allclose(views.t2i, brute_force_reciprocal(sims.T, min(k, sims.shape[0])).T)


def test_reciprocal_rerank_lifts_recall_on_hubby_scores():
    sims = noisy_scores(40, seed=3, noise=0.4)
    sims[:3] += 0.8  # three hub images
    plain, reranked = retrieval_metrics(sims.numpy()), reciprocal_rerank(Views.of(sims), 10)
    assert retrieval_metrics(reranked.i2t.numpy(), t2i_sims=reranked.t2i.numpy())["rsum"] > plain["rsum"]


ALL_STAGES = {
    "inverted softmax": PostHoc(inverted_softmax=0.1),
    "csls": PostHoc(csls=4),
    "reciprocal": PostHoc(reciprocal=6),
    "all three": PostHoc(inverted_softmax=0.1, csls=4, reciprocal=6),
    "amf": PostHoc(fuse="amf", reciprocal=6),
}


def run_stage(stage: PostHoc, matrices: list[torch.Tensor]) -> Views:
    return stage(matrices if stage.fuse == "amf" else matrices[:1])


@pytest.mark.parametrize("name", ALL_STAGES)
def test_stages_are_invariant_to_permuting_the_gallery(name):
    """Reordering the images and the captions reorders the output the same way."""
    matrices = [noisy_scores(10, seed=1), noisy_scores(10, seed=2, noise=1.2)]
    image_order, caption_order = torch.randperm(10), torch.randperm(50)
    original = run_stage(ALL_STAGES[name], matrices)
    permuted = run_stage(ALL_STAGES[name], [m[image_order][:, caption_order] for m in matrices])
    for before, after in zip((original.i2t, original.t2i), (permuted.i2t, permuted.t2i), strict=True):
        torch.testing.assert_close(after, before[image_order][:, caption_order])


def sibling_best_rerank(sims: torch.Tensor, k: int) -> torch.Tensor:
    """A leaky t2i re-ranker (as published code does): a caption's back rank at an image is the
    best rank there of any caption of its own image *by the 5-per-image ground truth*."""
    back = ranks(sims, dim=1)  # rank of caption c in image i's list
    siblings_best = back.view(sims.shape[0], -1, PER_IMAGE).amin(2).repeat_interleave(PER_IMAGE, dim=1)
    return _rerank_queries(sims.T, siblings_best.T, k).T


def labels_shuffled(stage, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """The stage run on the same scores with the captions reassigned to other images: the
    captions move to new columns (so `column // 5` names another image), and move back after."""
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(matrices[0].shape[1], generator=generator)
    output = stage([m[:, order] for m in matrices])
    return [view[:, order.argsort()] for view in output]


@pytest.mark.parametrize("name", ALL_STAGES)
def test_no_stage_reads_the_caption_to_image_assignment(name):
    matrices = [noisy_scores(10, seed=4), noisy_scores(10, seed=5, noise=1.2)]
    stage = ALL_STAGES[name]
    original = run_stage(stage, matrices)
    shuffled = labels_shuffled(lambda ms: (run_stage(stage, ms).i2t, run_stage(stage, ms).t2i), matrices)
    torch.testing.assert_close(shuffled[0], original.i2t)
    torch.testing.assert_close(shuffled[1], original.t2i)


def test_the_label_shuffle_catches_a_reranker_that_reads_the_ground_truth():
    matrices = [noisy_scores(10, seed=4)]
    original = sibling_best_rerank(matrices[0], 6)
    (shuffled,) = labels_shuffled(lambda ms: (sibling_best_rerank(ms[0], 6),), matrices)
    assert not torch.allclose(shuffled, original)


def test_mean_fusion_is_the_plain_average():
    first, second = noisy_scores(4, seed=1), noisy_scores(4, seed=2)
    views = mean_fuse([first, second])
    torch.testing.assert_close(views.i2t, (first + second) / 2)
    assert views.t2i is views.i2t


def test_amf_is_invariant_to_each_models_scale_and_prefers_the_consistent_model():
    good, noise = noisy_scores(30, seed=1, noise=0.3), noisy_scores(30, seed=2, noise=50.0) - 1
    fused = amf_fuse([good, noise])
    rescaled = amf_fuse([good * 7 + 3, noise * 0.01])
    torch.testing.assert_close(fused.i2t, rescaled.i2t)
    amf = retrieval_metrics(fused.i2t.numpy(), t2i_sims=fused.t2i.numpy())["rsum"]
    standardised = [(m - m.mean()) / m.std() for m in (good, noise)]
    plain = retrieval_metrics(mean_fuse(standardised).i2t.numpy())["rsum"]
    assert amf > plain


def test_amf_of_one_model_twice_ranks_as_that_model():
    sims = noisy_scores(8, seed=3)
    fused = amf_fuse([sims, sims])
    assert torch.equal(ranks(fused.i2t, 1), ranks(sims, 1)) and torch.equal(ranks(fused.t2i, 0), ranks(sims, 0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fuse": "max"}, "unknown fusion 'max'"),
        ({"csls": 0}, "csls takes a neighbourhood size k >= 1, got 0"),
        ({"reciprocal": 2.5}, "reciprocal takes a neighbourhood size k >= 1"),
        ({"inverted_softmax": -1.0}, "temperature must be a finite number > 0"),
        ({"inverted_softmax": float("nan")}, "temperature must be a finite number > 0"),
        ({"amf": AmfSettings(k=0)}, "amf takes a neighbourhood size"),
        ({"amf": AmfSettings(floor=0.0)}, "amf floor must be a finite number > 0"),
    ],
)
def test_bad_settings_are_one_line(options, message):
    with pytest.raises(InputError, match=message) as error:
        PostHoc(**options)
    assert "\n" not in str(error.value)


def test_amf_needs_two_models():
    with pytest.raises(InputError, match="at least 2 models"):
        PostHoc(fuse="amf")([noisy_scores(3)])


def test_describe_names_each_stage():
    assert PostHoc().describe() == "" and not PostHoc().active
    assert PostHoc("amf", 0.05, 10, 5).describe() == "amf fusion, inverted softmax 0.05, csls 10, reciprocal 5"


# -- wiring: evaluate_split, batch retrieval, the command line -------------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Untrained checkpoints of the service tests' presets (no family named here) on 20 scenes."""
    from service_setup import SIZES, make_checkpoint, make_gallery

    folder = tmp_path_factory.mktemp("posthoc")
    data = make_gallery(folder / "data", images=20)
    return data, [make_checkpoint(data, preset, folder / f"{preset}.pt") for preset in SIZES]


def scores_of(checkpoint, split) -> torch.Tensor:
    from itmatch.checkpoint import load_checkpoint
    from itmatch.evaluation.runner import encode_split
    from itmatch.scoring import score_grid

    model = load_checkpoint(checkpoint).eval()
    with torch.no_grad():
        return score_grid(model, *encode_split(model, split, progress=False))


def test_evaluate_split_applies_the_stages_per_fold(gallery):
    from itmatch.checkpoint import load_checkpoint
    from itmatch.data.precomp import PrecompSplit
    from itmatch.evaluation.runner import evaluate_split

    data, checkpoints = gallery
    split = PrecompSplit(data, "test")
    models = [load_checkpoint(path) for path in checkpoints]
    options = {"fuse": "amf", "csls": 3, "reciprocal": 4, "inverted_softmax": 0.5}
    result = evaluate_split(models, split, "coco-5fold", progress=False, **options)
    matrices = [scores_of(path, split) for path in checkpoints]
    for fold, metrics in enumerate(result["folds"]):
        block = (slice(4 * fold, 4 * fold + 4), slice(20 * fold, 20 * fold + 20))
        views = PostHoc(options["fuse"], options["inverted_softmax"], options["csls"], options["reciprocal"])(
            [m[block] for m in matrices]
        )
        expected = retrieval_metrics(views.i2t.numpy(), t2i_sims=views.t2i.numpy())
        assert metrics["i2t"] == pytest.approx(expected["i2t"]) and metrics["t2i"] == pytest.approx(expected["t2i"])
    assert {key: result[key] for key in options} == options


def test_evaluate_split_refuses_stages_with_two_stage_scoring(gallery):
    from itmatch.checkpoint import load_checkpoint
    from itmatch.data.precomp import PrecompSplit
    from itmatch.evaluation.runner import evaluate_split

    data, checkpoints = gallery
    with pytest.raises(InputError, match="without post-hoc stages"):
        evaluate_split(load_checkpoint(checkpoints[0]), PrecompSplit(data, "test"), progress=False, rerank_k=3, csls=2)


def test_batch_retrieval_ranks_by_the_stages(gallery):
    from itmatch.checkpoint import load_checkpoint
    from itmatch.data.precomp import PrecompSplit
    from itmatch.evaluation.runner import encode_split
    from itmatch.retrieval import search_images, search_texts

    data, checkpoints = gallery
    split = PrecompSplit(data, "test")
    model = load_checkpoint(checkpoints[0]).eval()
    images, texts = encode_split(model, split, progress=False)
    stages = PostHoc(csls=3, reciprocal=4)
    views = stages([scores_of(checkpoints[0], split)])
    _, found = search_images(model, images, split.captions, k=5, posthoc=stages)
    assert torch.equal(found, views.t2i.T.topk(5, dim=1).indices)
    _, found = search_texts(model, images, texts, k=5, posthoc=stages)
    assert torch.equal(found, views.i2t.topk(5, dim=1).indices)
    with pytest.raises(InputError, match="without rerank_k"):
        search_images(model, images, split.captions[:2], rerank_k=3, posthoc=stages)


def test_cli_evaluate_with_every_stage(gallery, tmp_path, capsys):
    from itmatch.cli import main

    data, checkpoints = gallery
    out = tmp_path / "m.json"
    command = [*map(str, checkpoints), "--data", str(data), "--quiet", "--json", str(out)]
    assert main(["evaluate", *command, "--fuse", "amf", "--csls", "3", "--reciprocal", "4"]) == 0
    result = json.loads(out.read_text())
    assert (result["fuse"], result["csls"], result["reciprocal"]) == ("amf", 3, 4)
    assert "(amf fusion, csls 3, reciprocal 4)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--csls", "0"], "argument --csls: must be >= 1, got 0"),
        (["--reciprocal", "x"], "argument --reciprocal: not an integer: 'x'"),
        (["--fuse", "max"], "argument --fuse: invalid choice: 'max'"),
        (["--fuse", "amf", "--one"], "amf fusion weighs several models' scores: give at least 2 models, got 1"),
        (["--csls", "2", "--rerank-k", "3"], "without post-hoc stages or fusion"),
    ],
)
def test_cli_bad_options_are_one_line(gallery, options, message, capsys):
    from itmatch.cli import main

    data, checkpoints = gallery
    paths = [str(checkpoints[0])] if "--one" in options else [str(checkpoints[0])] * 2
    options = [option for option in options if option != "--one"]
    try:
        status = main(["evaluate", *paths, "--data", str(data), "--quiet", *options])
    except SystemExit as usage_error:  # argparse's own
        status = usage_error.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
