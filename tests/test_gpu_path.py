"""The GPU path right by construction, checked on the CPU: predictions in the precision the model trained in (and a
clear error on NaN), thread counts from the CPU affinity, no per-step host sync, reloaded models channels_last,
per-epoch per-rank seeds, and the fp16 GradScaler path through a seam (users still get the CPU refusal)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.lib import common, engine, onnx_io
from pipeline.lib import precision as amp_precision
from pipeline.lib.common import PipelineError
from pipeline.lib.dataset import CellDataset, targets
from pipeline.lib.engine import TrainConfig, fit, predict
from pipeline.lib.losses import LabelLoss
from pipeline.lib.checkpoints import load_checkpoint, save_checkpoint
from pipeline.lib.models import create_model
from pipeline.lib.transforms import AugParams, build_transform
from helpers import train_cfg

CPU = torch.device("cpu")
CFG = train_cfg(epochs=1, batch_size=16, num_workers=0, device="cpu", seed=3, patience=5, warmup_epochs=0,
                precision="fp32")


def cells(n: int = 64, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(float)
    images[labels == 1, 8:16, 8:16] = [120, 20, 120]  # a purple "parasite", so there is something to learn
    return images, labels


def dataset(train: bool, n: int = 64, seed: int = 0):
    images, labels = cells(n, seed=seed)
    tf = build_transform(train, AugParams(affine=0, color=0, blur=0, noise=0, dropout=0), (0.5,) * 3, (0.25,) * 3)
    return CellDataset(images, targets(labels), tf, seed=1), labels


def train(tmp_path, cfg=CFG, loss_fn=None, live=None, model=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = model or create_model("resnet10t", drop_rate=0.2)
    ds, _ = dataset(True)
    save = lambda m, epoch, metric: save_checkpoint(tmp_path / "checkpoint.pt", m, arch="resnet10t", params={},
                                                    epoch=epoch, metric=metric)
    fit(model, ds, None, None, loss_fn or LabelLoss(), cfg, tmp_path, live=live, save=save)
    return model


# 1. Predictions in the training precision, never silently NaN

@pytest.mark.parametrize("trained,capability,expected", [
    ("fp32", (7, 5), "fp32"), ("fp16", (7, 5), "fp16"), ("bf16", (7, 5), "fp32"), ("bf16", (6, 0), "fp32"),
    ("bf16", (8, 0), "bf16"), ("fp16", (9, 0), "fp16"), ("fp32", (9, 0), "fp32")])
def test_predictions_run_in_the_training_precision_where_the_card_has_it(monkeypatch, trained, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert amp_precision.for_inference(trained, torch.device("cuda", 0)) == expected
    assert amp_precision.for_inference(trained, CPU) == "fp32"


def test_the_checkpoint_records_its_precision_and_predict_asks_for_it(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**CFG.__dict__, "precision": "bf16"})
    train(tmp_path, cfg)
    model, ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["precision"] == "bf16" and model.trained_precision == "bf16"
    asked = []
    monkeypatch.setattr(amp_precision, "for_inference", lambda trained, device: asked.append(trained) or "fp32")
    predict(model, dataset(False, 16)[0], CFG, CPU)
    predict(model, dataset(False, 16)[0], CFG, CPU, precision="fp32")
    assert asked == ["bf16", "fp32"]


def test_a_nan_probability_is_one_clear_error_naming_the_model_and_the_fix():
    model = create_model("resnet10t")
    with torch.no_grad():
        model.get_classifier().bias.fill_(float("nan"))
    with pytest.raises(PipelineError, match=r"resnet10t: 16 of 16 probabilities are NaN.*train.precision: fp32"):
        predict(model, dataset(False, 16)[0], CFG, CPU, desc="test")


# 2. Validation's loader built once per fit (a GPU's workers would otherwise start every epoch)

def test_validation_builds_its_loader_once_per_fit(tmp_path, monkeypatch):
    built = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *a, **k):
            built.append(k.get("persistent_workers"))
            super().__init__(*a, **k)

    monkeypatch.setattr(engine, "DataLoader", Counted)
    ds, _ = dataset(True)
    val, labels = dataset(False, 32, seed=1)
    tmp_path.mkdir(exist_ok=True)
    fit(create_model("resnet10t"), ds, val, labels.astype(int), LabelLoss(), TrainConfig(**{**CFG.__dict__,
        "epochs": 3}), tmp_path)
    assert len(built) == 2, built  # the training loader and the validation loader, for 3 epochs


# 5. Cores from the affinity, not the machine

def test_thread_counts_follow_the_cpu_affinity(monkeypatch, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 128)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    assert onnx_io.session(tmp_path / "m.onnx").get_session_options().intra_op_num_threads == 3
    assert common.available_cores() == 3 and engine.cores() == 3


# 7. No host sync per training step

def test_the_training_loop_reads_the_loss_once_per_epoch(tmp_path, monkeypatch):
    import sys

    calls = []
    real = torch.Tensor.item

    def item(self):  # the loop's own reads (AdamW reads its step counters, which live on the CPU)
        if sys._getframe(1).f_code.co_filename == engine.__file__:
            calls.append(sys._getframe(1).f_lineno)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    train(tmp_path, TrainConfig(**{**CFG.__dict__, "epochs": 2}))  # 4 steps an epoch
    assert len(calls) <= 2, f"{len(calls)} .item() calls in 2 epochs of 4 steps"


# 8. Reloaded models in the layout the pipeline feeds them

def test_a_reloaded_model_is_channels_last_and_layout_changing_views_agree(tmp_path):
    train(tmp_path)
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    views = ["identity", "transpose", "rot90", "antitranspose"]
    ds = dataset(False, 16)[0]
    p_cl = predict(model, ds, CFG, CPU, views)
    plain = load_checkpoint(tmp_path / "checkpoint.pt")[0].to(memory_format=torch.contiguous_format)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    from pipeline.lib.tta import apply_view

    with torch.no_grad():
        ref = np.stack([torch.softmax(plain(apply_view(x, v).contiguous()), 1)[:, 1].numpy() for v in views], 1)
    assert np.abs(p_cl - ref).max() < 1e-5


# 6. Seeds per epoch and rank

def test_each_rank_and_epoch_draws_its_own_stream_and_a_resumed_epoch_the_same():
    draws = {}
    for key in [(0, 1), (1, 1), (0, 2), (0, 1)]:
        rng = engine.seed_epoch(3, key[1], key[0])
        draws.setdefault(key, []).append((torch.rand(4), rng.random()))
    (t01, r01), (t01b, r01b) = draws[(0, 1)]
    assert torch.equal(t01, t01b) and r01 == r01b  # the same epoch of the same rank, e.g. after a resume
    assert not torch.equal(t01, draws[(1, 1)][0][0]) and not torch.equal(t01, draws[(0, 2)][0][0])


# 9. fp16 with a GradScaler, through a seam: CPU autocast in float16 and torch's CPU GradScaler

@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Users get the refusal (`precision.choose`); the tests take the fp16 path on the CPU, with a scaler that grows
    every 2 clean steps so growth is seen in a short run."""
    with pytest.raises(PipelineError, match="fp16, which needs a CUDA GPU"):
        amp_precision.choose("fp16", CPU, "resnet10t")
    scalers = []

    def autocast(precision, device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2))
        return torch.autocast("cpu", dtype=torch.float16), scalers[-1]

    monkeypatch.setattr(engine.amp_precision, "choose", lambda requested, device, arch: "fp16")
    monkeypatch.setattr(engine.amp_precision, "autocast", autocast)
    return scalers


def test_fp16_scale_grows_and_an_inf_gradient_skips_the_step(tmp_path, fp16_on_cpu):
    model = create_model("resnet10t")
    seen = []

    def loss(logits, y):
        step = len(seen)
        seen.append(({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()},
                     fp16_on_cpu[0].get_scale()))
        out = LabelLoss()(logits, y)
        return out * float("inf") if step == 4 else out

    train(tmp_path, TrainConfig(**{**CFG.__dict__, "epochs": 2}), loss_fn=loss, model=model)
    scales = [s for _, s in seen]
    assert scales[2] == 2 * scales[0] and scales[4] == 2 * scales[2]  # grows every 2 clean steps
    assert scales[5] == scales[4] / 2  # the inf halves it ...
    before, after = seen[4][0], seen[5][0]
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_fp16_gradients_are_clipped_after_unscaling(tmp_path, fp16_on_cpu, monkeypatch):
    norms, real = [], torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        params = list(params)
        norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train(tmp_path, loss_fn=LabelLoss())
    assert norms and max(norms) < 2.0 ** 10 / 100  # the scaled gradients would be ~1000x these


def test_a_killed_fp16_run_resumes_with_the_scalers_state(tmp_path, fp16_on_cpu, monkeypatch):
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    scale_at = {}

    def loss(run):
        def f(logits, y):
            scale_at.setdefault(run, []).append(fp16_on_cpu[-1].get_scale())
            return LabelLoss()(logits, y)
        return f

    train(tmp_path / "unbroken", cfg, loss_fn=loss("unbroken"))
    real_log_live = engine._log_live
    monkeypatch.setattr(engine, "_log_live", lambda live, m: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed", cfg, loss_fn=loss("killed"))
    saved = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["scaler"]
    assert saved["scale"] == scale_at["unbroken"][4] and "_growth_tracker" in saved
    monkeypatch.setattr(engine, "_log_live", real_log_live)
    train(tmp_path / "killed", cfg, loss_fn=loss("resumed"))
    assert scale_at["resumed"] == scale_at["unbroken"][4:]  # epoch 2 starts where the unbroken run was


def test_timing_warms_every_view_and_starts_no_loader_workers(tmp_path, monkeypatch):
    import pipeline.distill as distill

    train(tmp_path)
    calls, built = [], []
    real_predict = distill.predict

    def recorded(model, ds, cfg, device, views, crop_scale, desc):
        calls.append((desc, tuple(views)))
        return real_predict(model, ds, cfg, device, views, crop_scale, desc=desc)

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *a, **k):
            built.append(k.get("num_workers"))
            super().__init__(*a, **k)

    monkeypatch.setattr(distill, "predict", recorded)
    monkeypatch.setattr(engine, "DataLoader", Counted)
    cfg = TrainConfig(**{**CFG.__dict__, "num_workers": 4})
    ms = distill.inference_ms([tmp_path / "checkpoint.pt"] * 2, cells(16)[0], cfg,
                              {"plain": ["identity"], "tta": ["identity", "hflip", "transpose"]}, 0.875)
    warmed = {v for desc, views in calls if desc == "warm-up" for v in views}
    timed = [views for desc, views in calls if desc == "timing"]
    assert timed and all(set(v) <= warmed for v in timed) and calls[0][0] == "warm-up"
    assert set(built) == {0} and ms["tta"] > 0


# torch.compile (train.compile): off unless asked, checkpoints and fingerprints unaffected

def test_compile_is_off_unless_asked_and_never_in_the_fingerprint():
    net = torch.nn.Linear(2, 2)
    assert engine.compiled(net, "auto", CPU) is net and engine.compiled(net, False, CPU) is net
    on = TrainConfig(**{**CFG.__dict__, "compile": True})
    assert engine.run_fingerprint(on, None) == engine.run_fingerprint(CFG, None)


def test_compile_without_a_cxx_compiler_trains_uncompiled_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    net = torch.nn.Linear(2, 2)
    assert engine.compiled(net, True, CPU) is net
    assert "no C++ compiler" in caplog.text


def test_a_compiled_run_saves_plain_weights_and_predicts_as_the_eager_one(tmp_path):
    eager = train(tmp_path / "eager")
    on = train(tmp_path / "compiled", TrainConfig(**{**CFG.__dict__, "compile": True}))
    ck = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert not [k for k in ck["state_dict"] if "_orig_mod" in k]
    ds = dataset(False, 32, seed=2)[0]
    a, b = (predict(m, ds, CFG, CPU)[:, 0] for m in (eager, on))
    assert np.abs(a - b).max() < 0.01  # measured 0.0025 after 4 steps: compiled kernels round differently
