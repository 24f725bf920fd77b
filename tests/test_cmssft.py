"""cm-SSFT adapted to image-text: the transfer follows its definition written node by node, the
inductive score is the shared features' cosine, the projector and the encoders step their own
parameters, and short training learns (the transductive score reported apart)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pooled_training import CHANCE_RSUM, make_scenes, train_briefly

from itmatch import build_run_config, create_model
from itmatch.cli import main
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.errors import InputError
from itmatch.evaluation.runner import evaluate_split
from itmatch.losses import TrainingContext
from itmatch.models.base import Encoded
from itmatch.models.cmssft import shared_specific_transfer
from itmatch.scoring import score_grid

SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 8, "text": {"word_dim": 8}}


def cmssft(**changes):
    torch.manual_seed(0)
    return create_model("cmssft", build_run_config("cmssft", {"model": merge(SIZES, changes)}).model)


def unit(n, d, generator):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)


def softmax_over(logits: dict[int, float]) -> dict[int, float]:
    peak = max(logits.values())
    weights = {k: torch.exp(torch.tensor(v - peak)).item() for k, v in logits.items()}
    return {k: w / sum(weights.values()) for k, w in weights.items()}


def test_transfer_equals_its_definition_node_by_node():
    generator, t = torch.Generator().manual_seed(0), 0.3
    images = Encoded({"vector": unit(3, 4, generator), "specific": unit(3, 4, generator)})
    texts = Encoded({"vector": unit(5, 4, generator), "specific": unit(5, 4, generator)})
    fused_images, fused_texts = shared_specific_transfer(images, texts, t)
    zero = torch.zeros(4, dtype=torch.float64)
    nodes = [torch.cat([s, p, zero]) for s, p in zip(images["vector"], images["specific"], strict=True)]
    nodes += [torch.cat([s, zero, p]) for s, p in zip(texts["vector"], texts["specific"], strict=True)]
    shared = torch.cat([images["vector"], texts["vector"]])
    modality = [0] * 3 + [1] * 5
    expected = []
    for i in range(8):
        gathered = torch.zeros(12, dtype=torch.float64)
        for same in (True, False):
            others = [j for j in range(8) if j != i and (modality[j] == modality[i]) == same]
            weights = softmax_over({j: float(shared[i] @ shared[j]) / t for j in others})
            gathered += sum(w * nodes[j] for j, w in weights.items()) / 2
        fused = torch.cat([nodes[i], gathered])
        expected.append(fused / fused.norm())
    torch.testing.assert_close(torch.cat([fused_images, fused_texts]), torch.stack(expected))


def batch(n_images=4, per_image=2):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (n_images * per_image,), generator=generator)
    tokens = torch.randint(4, 30, (len(lengths), 9), generator=generator) * (torch.arange(9) < lengths[:, None])
    features = torch.randn(n_images, 6, 20, generator=generator).repeat_interleave(per_image, 0)
    index = torch.arange(len(lengths)) // per_image
    return {"features": features, "tokens": tokens, "lengths": lengths, "image_index": index}


def test_the_score_is_the_shared_cosine_and_the_projector_steps_alone():
    model = cmssft()
    data, context = batch(), TrainingContext(build_run_config("cmssft").loss)
    with torch.no_grad():
        images, texts = model.encode_image_batch(data), model.encode_text_batch(data)
        torch.testing.assert_close(score_grid(model, images, texts), images["vector"] @ texts["vector"].T)
    terms = model(data, context)
    assert set(terms) == {"triplet", "transfer", "modality", "projection", "reconstruction"}
    projector = {name for name, _ in model.named_parameters() if ".projector." in name}
    assert {id(p) for p in model.adversary_parameters()} == {
        id(p) for n, p in model.named_parameters() if n in projector
    }
    main = [p for group in model.parameter_groups() for p in group["params"]]
    assert not {id(p) for p in main} & {id(p) for p in model.adversary_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.adversary_parameters(), lr=1e-2)
    model(data, context, adversary=True)["projector"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in projector)
    optimizer.step()
    assert {n for n, p in model.named_parameters() if not torch.equal(before[n], p)} == projector


def test_a_model_without_a_transductive_score_says_so(tmp_path):
    from itmatch.models.vsepp import VSEPP

    with pytest.raises(InputError, match="no transductive score"):
        VSEPP.transductive_scores(create_model("vsepp", build_run_config("vsepp").model), None, None)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_scenes(tmp_path_factory.mktemp("scenes"))


def test_short_training_beats_chance_by_a_wide_margin_inductively_and_transductively(scenes, tmp_path, capsys):
    model, _ = train_briefly("cmssft", scenes, tmp_path, {"loss": {"negatives": "sum"}})
    test = PrecompSplit(scenes, "test")
    inductive = evaluate_split(model, test, progress=False)
    transductive = evaluate_split(model, test, progress=False, transductive=True)
    assert transductive["transductive"] and not inductive["transductive"]
    assert min(inductive["rsum"], transductive["rsum"]) > 2 * CHANCE_RSUM, (inductive, transductive)
    main(["evaluate", str(tmp_path / "best.pt"), "--data", str(scenes), "--transductive", "--quiet"])
    assert "cmssft (transductive)" in capsys.readouterr().out
