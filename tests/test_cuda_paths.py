"""Defects of the CUDA paths found by reading them (issue 18, point 9), each checked on CPU: the CUDA
RNG states restored only for the GPUs visible (a faked device count), one system-metrics monitor per
trial, the spec refusing idle GPUs and seq_len 2 under DDP, the test NLL scored in fp32, the sampler's
uniforms drawn once a frame on the generator's device, fractional-GPU memory caps, each data-parallel
rank on its own GPU, the ConvLSTM's cell state in fp32 under bf16 autocast, cuDNN's autotuner on CUDA
only, and channels_last logits scored without a copy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from pipeline.sweep.spec.sweep import SpecError, load_spec
from pipeline.sweep.trials import distributed, trainable
from vpn import sample as vpn_sample
from vpn import train as vpn_train
from vpn.config import TrainConfig, VPNConfig
from vpn.evaluate import full_precision, score
from vpn.layers import ConvLSTM
from vpn.metrics import categorical_cross_entropy
from vpn.model import VideoPixelNetwork, _categorical_nll
from vpn.train import Trainer

MODEL = VPNConfig(enc_blocks=1, dec_blocks=1, filter_fraction=0.03125, output="bernoulli")
TRAIN = TrainConfig(steps=2, batch_size=2, context=2, device="cpu", num_workers=0)


def test_resume_restores_cuda_rng_only_for_visible_gpus(monkeypatch):
    """A checkpoint written on a node of 2 visible GPUs, resumed where 1 is visible."""
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append(device))
    states = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    vpn_train.restore_cuda_rng(states)
    assert set_calls == [0]

    data = torch.randint(0, 256, (4, 4, 1, 8, 8), dtype=torch.uint8)
    trainer = Trainer(MODEL, TRAIN, data)
    state = trainer.state_dict()
    state["rng"]["cuda"] = states
    set_calls.clear()
    Trainer(MODEL, TRAIN, data).load_state_dict(state)  # the Trainer's resume path
    assert set_calls == [0]


@pytest.mark.parametrize("rank", [0, 1])
def test_one_system_metrics_monitor_per_trial(monkeypatch, rank):
    started = []
    monkeypatch.setattr(trainable, "_system_metrics", lambda cfg: started.append(cfg) or SimpleNamespace(finish=list))
    monkeypatch.setattr(trainable._TrialRun, "open", classmethod(lambda cls, cfg, tags: None))
    monkeypatch.setattr(trainable, "_train", lambda cfg, run, session: None)
    cfg = SimpleNamespace(mode="train", system_metrics=True, run_id="r")
    trainable.run_trial(cfg, session=None, tags={}, rank=rank)
    assert len(started) == (1 if rank == 0 else 0)


def _spec_error(tmp_path, run: dict, train: dict) -> str:
    spec = {
        "name": "c",
        "data": "data",
        "model": {"output": "bernoulli", "filter_fraction": 0.03125},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 4, "context": 1, "device": "cpu", **train},
        "run": run,
        "profiles": {"gpu": {}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as info:
        load_spec(path, root=tmp_path)
    return str(info.value)


def test_spec_refuses_gpus_a_one_worker_trial_leaves_idle(tmp_path):
    msg = _spec_error(tmp_path, {"gpus_per_trial": 2}, {})
    assert "run.gpus_per_trial" in msg and "workers_per_trial=1" in msg
    msg = _spec_error(tmp_path, {"gpus_per_worker": 4}, {})
    assert "run.gpus_per_worker" in msg


def test_spec_refuses_seq_len_2_with_data_parallel_workers(tmp_path):
    msg = _spec_error(tmp_path, {"workers_per_trial": 2}, {"seq_len": 2})
    assert "train.seq_len" in msg and "run.workers_per_trial=2" in msg


def test_trial_scores_in_fp32_as_vpn_eval_does(monkeypatch):
    """A Trainer training in bf16 scores its test NLL in fp32: the number `vpn eval` gives."""
    data = torch.randint(0, 256, (4, 4, 1, 8, 8), dtype=torch.uint8)
    trainer = Trainer(MODEL, TRAIN, data)
    trainer.cpu_bf16 = True  # as on CUDA: the training forward runs under bf16 autocast
    assert trainer.precision == "bf16"
    got = trainer.score(data).nats_per_frame
    with torch.no_grad():
        fp32 = score(trainer.model, data, TRAIN).nats_per_frame  # what python -m vpn eval calls
        bf16 = score(trainer.model, data, TRAIN, autocast=trainer._autocast).nats_per_frame
    assert got == fp32
    assert bf16 != fp32  # so the test above could fail: bf16 gives another number


def test_full_precision_turns_tf32_off_and_restores_it():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_precision("cpu"):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


# -- the sampler's uniforms: one torch.rand a frame, on the generator's device ------------------------
def _rand_calls(monkeypatch) -> list[tuple[tuple[int, ...], torch.device]]:
    """Record every torch.rand call as (size, device it draws on), then draw as torch.rand does."""
    calls, real = [], torch.rand

    def rand(*size, generator=None, device=None):
        calls.append((tuple(size), torch.device(device) if device is not None else None))
        return real(*size, generator=generator, device=device)

    monkeypatch.setattr(torch, "rand", rand)
    return calls


def _sampling_model(decoder: str = "pixelcnn", colours: int = 1) -> VideoPixelNetwork:
    torch.manual_seed(0)
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=colours, decoder=decoder)
    return VideoPixelNetwork(cfg).eval()


@pytest.mark.parametrize(
    "decoder,method", [("pixelcnn", "cached"), ("pixelcnn", "naive"), ("stacks", "cached"), ("baseline", "cached")]
)
def test_sampler_draws_each_frames_uniforms_at_once(monkeypatch, decoder, method):
    """One torch.rand of the frame's shape (B, C, H, W) a frame, on the generator's device: the
    generator advances by exactly n frames' uniforms, and not by one pixel's each (a sync each on CUDA).
    The cached and naive samplers' frames from one seed equal each other: tests/test_sample.py."""
    model = _sampling_model(decoder, colours=3)
    context = torch.randint(0, 256, (2, 2, 3, 2, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    calls = _rand_calls(monkeypatch)
    generator = torch.Generator().manual_seed(5)
    video = vpn_sample.sample_video(model, context, 2, generator, method=method)
    assert video.shape == (2, 2, 3, 2, 3)
    assert calls == [((2, 3, 2, 3), torch.device("cpu"))] * 2
    monkeypatch.undo()
    reference = torch.Generator().manual_seed(5)
    for _ in range(2):
        torch.rand(2, 3, 2, 3, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_uniforms_come_from_the_generators_device_moved_once(monkeypatch):
    """A CPU generator driving a model elsewhere (here the meta device, which needs no GPU): the one
    torch.rand runs on the CPU, where the generator is, and the result lands on the model's device;
    its numbers are those the generator draws on the CPU, so a seed gives the same frames anywhere."""
    calls = _rand_calls(monkeypatch)
    moved = vpn_sample.uniforms((2, 1, 3, 4), torch.Generator().manual_seed(3), "meta")
    assert moved.device.type == "meta" and moved.shape == (2, 1, 3, 4)
    here = vpn_sample.uniforms((2, 1, 3, 4), torch.Generator().manual_seed(3), "cpu")
    assert calls == [((2, 1, 3, 4), torch.device("cpu"))] * 2
    assert torch.equal(here, _rand(torch.Generator().manual_seed(3)))
    # No generator: torch's global generator of the model's own device, as torch.rand(device=) draws.
    calls.clear()
    vpn_sample.uniforms((2,), None, "meta")
    assert calls == [((2,), torch.device("meta"))]


def _rand(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(2, 1, 3, 4, generator=generator)


@pytest.mark.parametrize(
    "decoder,method", [("pixelcnn", "cached"), ("pixelcnn", "naive"), ("stacks", "cached"), ("baseline", "cached")]
)
def test_each_sub_pixel_is_drawn_with_its_own_uniform(monkeypatch, decoder, method):
    """Sub-pixel (b, c, i, j) is drawn with u[b, c, i, j] of its frame's uniforms, in every sampler:
    with u = 0 a coin always comes up 255 (p > 0), with u = 1 - 2^-24 (torch.rand's largest) never."""
    torch.manual_seed(0)
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=3, decoder=decoder, output="bernoulli")
    model = VideoPixelNetwork(cfg).eval()
    pattern = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(4)) < 0.5  # (B, C, H, W)
    u = torch.where(pattern, 0.0, 1.0 - 2.0**-24)
    monkeypatch.setattr(vpn_sample, "uniforms", lambda shape, generator, device: u.to(device))
    context = torch.zeros(2, 1, 3, 2, 3, dtype=torch.uint8)
    frame = vpn_sample.sample_video(model, context, 1, method=method)[:, 0]  # (B, C, H, W)
    assert torch.equal(frame, pattern.to(torch.uint8) * 255)


# -- fractional GPUs, and each data-parallel rank on its own GPU ----------------------------------------
def _fake_cuda(monkeypatch, total_gib: float = 80.0, fraction: float = 1.0) -> list:
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: set_calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: fraction)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=total_gib * 2**30))
    return set_calls


def test_a_fractional_gpu_trial_caps_its_memory(monkeypatch):
    set_calls = _fake_cuda(monkeypatch)
    assert trainable.cap_gpu_memory(0.5, torch.device("cuda")) == 0.5
    assert trainable.cap_gpu_memory(0.25, torch.device("cuda:1")) == 0.25
    assert set_calls == [(0.5, 0), (0.25, 1)]
    set_calls.clear()
    for gpus, device in [(1.0, "cuda"), (0.0, "cuda"), (0.5, "cpu")]:  # a whole GPU, none, a CPU trial
        assert trainable.cap_gpu_memory(gpus, torch.device(device)) is None
    assert set_calls == []


def test_auto_memory_settings_plan_for_the_capped_share(monkeypatch):
    _fake_cuda(monkeypatch, total_gib=80.0, fraction=0.5)
    assert vpn_train.gpu_memory_gib(torch.device("cuda:0")) == 40.0


def test_the_trial_sets_the_cap_from_the_gpus_ray_granted(monkeypatch):
    """trainable.trial: the granted {"GPU": 0.5} reaches cap_gpu_memory before the Trainer is built."""
    capped, ran = [], []
    cfg = SimpleNamespace(train=TrainConfig(device="cpu"))
    ctx = SimpleNamespace(
        get_trial_id=lambda: "t",
        get_trial_name=lambda: "n",
        get_trial_resources=lambda: SimpleNamespace(required_resources={"CPU": 1.0, "GPU": 0.5}),
    )
    import ray.tune

    monkeypatch.setattr(ray.tune, "get_context", lambda: ctx)
    monkeypatch.setattr(trainable.search, "trial_config", lambda config: cfg)
    monkeypatch.setattr(trainable, "searched_run", lambda c, trial_id: c)
    monkeypatch.setattr(trainable, "cap_gpu_memory", lambda gpus, device: capped.append((gpus, device)))
    monkeypatch.setattr(trainable, "require_usable_gpu", lambda gpus: None)  # no CUDA here (tests/test_bad_inputs.py)
    monkeypatch.setattr(trainable, "run_trial", lambda c, session, tags: ran.append(capped[:]))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    trainable.trial({})
    assert ran == [[(0.5, torch.device("cpu"))]]


def test_each_data_parallel_rank_trains_on_the_gpu_ray_gave_it():
    rank3 = lambda: torch.device("cuda:3")
    assert distributed.rank_device("cuda:0", rank3) == "cuda:3"  # not every rank on GPU 0
    assert distributed.rank_device("cuda", rank3) == "cuda:3"
    assert distributed.rank_device("cpu", rank3) == "cpu"
    with pytest.raises(ValueError, match="train.device='cuda:0'.*gpus_per_worker"):
        distributed.rank_device("cuda:0", lambda: torch.device("cpu"))


def test_a_resumed_trial_trains_on_its_own_device_not_the_checkpoints(monkeypatch):
    """Rank 0 saves the checkpoint with its device: a restored rank must keep its own (the override)."""
    loads, restored = [], []
    monkeypatch.setattr(trainable, "training_source", lambda *a: None)
    monkeypatch.setattr(trainable, "MovingMNIST", lambda *a: None)
    monkeypatch.setattr(trainable.Trainer, "from_checkpoint", lambda p, *a, **kw: loads.append(kw))

    def restore(tune, fresh, load, run, run_id):
        restored.append(load(Path("checkpoint.pt")))
        raise StopIteration  # enough: the loader is what is checked

    monkeypatch.setattr(trainable, "_restore", restore)
    cfg = SimpleNamespace(train=TrainConfig(device="cuda:2"), data="d", model=MODEL, run_id="r")
    with pytest.raises(StopIteration):
        trainable._train(cfg, None, None)
    assert loads == [{"device": "cuda:2"}]


# -- the ConvLSTM's cell state, cuDNN's autotuner, channels_last logits ---------------------------------
def _lstm_steps(lstm: ConvLSTM, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    state, states = None, []
    for t in range(x.shape[1]):
        state = lstm.step(x[:, t], state)
        states.append(state)
    return states


def test_convlstm_keeps_its_cell_state_in_fp32_under_bf16_autocast():
    """Under bf16 autocast over 19 steps: c stays fp32 (h is bf16, as the convs that read it cast it),
    and c is closer to the fp32 run's than a cell state updated in bf16 is."""
    torch.manual_seed(0)
    lstm = ConvLSTM(4, 8)
    x = torch.randn(2, 19, 4, 6, 6)
    reference = _lstm_steps(lstm, x)  # fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _lstm_steps(lstm, x)
        assert lstm(x).dtype == torch.bfloat16
    assert all(c.dtype == torch.float32 and h.dtype == torch.bfloat16 for h, c in mixed)
    assert all(c.dtype == torch.float32 and h.dtype == torch.float32 for h, c in reference)

    def bf16_cell(gates_x, state):  # the update in bf16, as before the fix
        h, c = state if state is not None else (None, torch.zeros((), dtype=torch.bfloat16))
        gates = gates_x if h is None else gates_x + lstm.conv_h(h)
        i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    state = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for t in range(x.shape[1]):
            state = bf16_cell(lstm.conv_x(x[:, t]), state)
    assert state[1].dtype == torch.bfloat16
    c_ref = reference[-1][1]
    assert (mixed[-1][1] - c_ref).abs().mean() < (state[1].float() - c_ref).abs().mean()


def test_convlstm_in_fp32_and_fp64_casts_nothing():
    """Without autocast the cell is the plain formula, bit for bit, in the input's dtype."""
    torch.manual_seed(0)
    lstm = ConvLSTM(4, 8).double()
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    (h0, c0), (h1, c1), _ = _lstm_steps(lstm, x)
    i, f, o, g = (lstm.conv_x(x[:, 1]) + lstm.conv_h(h0)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
    assert c1.dtype == h1.dtype == torch.float64
    assert torch.equal(c1, c) and torch.equal(h1, torch.sigmoid(o) * torch.tanh(c))


def test_cudnn_autotuner_on_cuda_only():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        Trainer(MODEL, TRAIN, torch.randint(0, 256, (4, 4, 1, 8, 8), dtype=torch.uint8))
        assert torch.backends.cudnn.benchmark is False  # CPU: untouched
        vpn_train.autotune_convolutions(torch.device("cuda"))  # sets a flag only: no GPU needed
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def _copies_of_at_least(numel: int, fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    big = []
    for e in prof.key_averages(group_by_input_shape=True):
        shape = e.input_shapes[0] if e.input_shapes else None
        if e.key in ("aten::copy_", "aten::clone", "aten::contiguous") and shape and torch.Size(shape).numel() >= numel:
            big.append(f"{e.key} {shape}")
    return big


@pytest.mark.parametrize("colours", [1, 3])
def test_channels_last_logits_are_scored_without_a_copy(colours):
    """The decoder's channels_last logits (CUDA's default): the categorical NLL reads them in place,
    where the log_softmax over dim 1 copied all of them first; the same numbers to float rounding,
    and contiguous logits (CPU's default) take the old path, bit for bit."""
    b, t, h, w = 2, 3, 5, 6
    nchw = torch.randn(b * t, colours * 256, h, w, generator=torch.Generator().manual_seed(0))
    as_logits = lambda x: x.unflatten(1, (colours, 256)).unflatten(0, (b, t))
    target = torch.randint(0, 256, (b, t, colours, h, w), dtype=torch.uint8)
    contiguous, nhwc = as_logits(nchw), as_logits(nchw.contiguous(memory_format=torch.channels_last))
    reference = categorical_cross_entropy(contiguous, target)
    assert torch.equal(_categorical_nll(contiguous, target), reference)
    torch.testing.assert_close(_categorical_nll(nhwc, target), reference, rtol=1e-6, atol=1e-5)
    assert _copies_of_at_least(nchw.numel(), lambda: categorical_cross_entropy(nhwc, target))  # the copy was real
    assert _copies_of_at_least(nchw.numel(), lambda: _categorical_nll(nhwc, target)) == []
