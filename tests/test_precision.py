"""precision="auto": the fastest precision this machine runs well, measured once and cached."""

from __future__ import annotations

import json

import pytest
import torch
from test_models import inputs, small_model

from itmatch import precision
from itmatch.errors import ConfigError
from itmatch.scoring import ScoringOptions, score_grid

CPU = torch.device("cpu")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine whose matrix products run at the speeds `machine.gflops` says, counting the
    measurements; the cache in a fresh folder and no override."""
    monkeypatch.setenv("ITMATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(precision.OVERRIDE, raising=False)
    measured = []

    def fake_gflops(device, dtype, repeats=5):
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        measured.append(name)
        return fake.gflops[name]

    fake = type("Machine", (), {"gflops": {"fp32": 100.0, "bf16": 220.0}, "measured": measured})
    monkeypatch.setattr(precision, "_matmul_gflops", fake_gflops)
    precision.calibration.cache_clear()
    yield fake
    precision.calibration.cache_clear()


@pytest.mark.parametrize("bf16, chosen", [(220.0, "bf16"), (60.0, "fp32"), (110.0, "fp32")])
def test_auto_takes_a_faster_precision_only_with_a_clear_margin(machine, bf16, chosen):
    machine.gflops["bf16"] = bf16  # an AMD EPYC, an Intel Xeon without AMX, a near tie
    assert precision.resolve("auto", CPU) == chosen
    assert precision.resolve("fp32", CPU) == "fp32"  # explicit precisions are kept


def test_the_calibration_is_measured_once_per_machine_and_cached_on_disk(machine, tmp_path):
    assert precision.resolve("auto", CPU) == "bf16"
    assert sorted(machine.measured) == ["bf16", "fp32"]
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert [entry["chosen"] for entry in cached.values()] == ["bf16"]
    precision.calibration.cache_clear()  # a new process: reads the file, measures nothing
    machine.gflops["bf16"] = 1.0
    assert precision.resolve("auto", CPU) == "bf16" and len(machine.measured) == 2
    assert "bf16: GFLOP/s" in precision.calibration(CPU).describe()


def test_a_damaged_cache_is_measured_again(machine, tmp_path):
    (tmp_path / "precision.json").write_text("{not json")
    assert precision.resolve("auto", CPU) == "bf16"
    assert json.loads((tmp_path / "precision.json").read_text())  # rewritten whole


def test_the_environment_overrides_auto_and_a_bad_value_is_one_line(machine, monkeypatch):
    monkeypatch.setenv(precision.OVERRIDE, "fp32")
    assert precision.resolve("auto", CPU) == "fp32" and not machine.measured
    monkeypatch.setenv(precision.OVERRIDE, "fp8")
    with pytest.raises(ConfigError, match="ITMATCH_PRECISION='fp8'"):
        precision.resolve("auto", CPU)


@torch.no_grad()
def test_auto_scoring_is_the_chosen_precision(machine):
    model = small_model("scan-t2i-ave").eval()
    features, tokens, lengths, _ = inputs()
    encoded = model.encode_images(features), model.encode_texts(tokens, lengths)
    auto = score_grid(model, *encoded, ScoringOptions(precision="auto"))
    assert torch.equal(auto, score_grid(model, *encoded, ScoringOptions(precision="bf16")))
    assert not torch.equal(auto, score_grid(model, *encoded, ScoringOptions(precision="fp32")))


def test_auto_never_takes_the_gradient_away_from_training(machine):
    model = small_model("scan-t2i-ave").train()
    features, tokens, lengths, _ = inputs(n_images=6, n_captions=6)
    scores = model.similarity(features, tokens, lengths)  # precision "auto", gradients recorded
    scores.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_training_in_bf16_autocast_takes_auto_from_the_calibration(machine, tmp_path):
    assert precision.training_precision("auto", CPU) == "bf16"
    machine.gflops["bf16"] = 50.0  # another machine
    precision.calibration.cache_clear()
    (tmp_path / "precision.json").unlink()
    assert precision.training_precision("auto", CPU) == "fp32"
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        precision.training_precision("fp16", CPU)


def test_training_under_bf16_autocast_keeps_fp32_weights(tmp_path):
    from itmatch.config import build_run_config
    from itmatch.data.synthetic import make_synthetic
    from itmatch.training import train

    make_synthetic(tmp_path / "data", {"train": 40, "dev": 10, "test": 10}, seed=1)
    overrides = {"model": {"embed_size": 16, "text": {"word_dim": 16}}, "train": {"epochs": 1, "batch_size": 10}}
    config = build_run_config("scan-t2i-ave", overrides | {"train": overrides["train"] | {"precision": "bf16"}})
    state = train(config, tmp_path / "data", tmp_path / "run", progress=False, log=lambda *_: None)
    assert torch.isfinite(torch.tensor(state.history[0]["loss"]))
    weights = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert all(value.dtype == torch.float32 for value in weights.values() if value.is_floating_point())


def test_cpus_of_one_model_name_with_other_bf16_extensions_are_other_machines(monkeypatch):
    def cpu(flags: str):
        monkeypatch.setattr(precision, "_cpuinfo", lambda: {"model name": "AMD EPYC", "flags": flags})
        return precision.machine_name(CPU)

    plain, with_bf16 = cpu("fpu avx2"), cpu("fpu avx2 avx512f avx512_bf16")
    assert plain != with_bf16 and "avx512_bf16" in with_bf16 and plain.startswith("AMD EPYC")
