"""The speed work computes the same function: the benchmarks' plain reference (four separate MU
convs, full masked kernels, an LSTM that convolves its zero state) against the fast model with the
same weights, channels_last and torch.compile against the default, the analytic FLOP count against
what the plain model executes, and the sampler's inverse-CDF draw against the softmax."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference import PlainConvLSTM, PlainMaskedConv2d, SeparateMultiplicativeUnit, reference_model
from vpn import VideoPixelNetwork, VPNConfig
from vpn.config import TrainConfig
from vpn.layers import MaskedConv2d, MultiplicativeUnit
from vpn.sample import draw
from vpn.train import Trainer


def tiny_cfg(**kw) -> VPNConfig:
    return VPNConfig.preset("micro", filter_fraction=8 / 128, **kw)


def frames(colours: int = 1, b: int = 2, t: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, colours, size, size), generator=gen, dtype=torch.uint8)


def fused_grads(model: VideoPixelNetwork) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def reference_grads_as_fused(ref: VideoPixelNetwork) -> dict[str, torch.Tensor]:
    """The reference's gradients under the fast model's names: each MU's four conv grads
    concatenated in g1 | g2 | g3 | u order, as `gates` holds them."""
    out = {}
    for name, module in ref.named_modules():
        if isinstance(module, SeparateMultiplicativeUnit):
            parts = (module.conv_g1, module.conv_g2, module.conv_g3, module.conv_u)
            out[f"{name}.gates.weight"] = torch.cat([p.weight.grad for p in parts])
            out[f"{name}.gates.bias"] = torch.cat([p.bias.grad for p in parts])
    for name, p in ref.named_parameters():
        if ".conv_g" not in name and ".conv_u" not in name:
            out[name] = p.grad
    return out


@pytest.mark.parametrize(
    "colours,output,dilation", [(1, "categorical", False), (3, "categorical", True), (1, "bernoulli", False)]
)
def test_reference_model_is_plain_and_computes_the_same_function(colours, output, dilation):
    torch.manual_seed(0)
    model = VideoPixelNetwork(tiny_cfg(image_channels=colours, output=output, dilation=dilation)).double()
    ref = reference_model(model, dtype=torch.float64)
    # The reference really is the plain model: no fused MU, no row-skipping masked conv, plain LSTM.
    assert not any(isinstance(m, (MultiplicativeUnit, MaskedConv2d)) for m in ref.modules())
    assert sum(isinstance(m, SeparateMultiplicativeUnit) for m in ref.modules()) == 2 * (
        model.cfg.enc_blocks + model.cfg.dec_blocks
    )
    assert any(isinstance(m, PlainMaskedConv2d) for m in ref.modules()) and isinstance(ref.lstm, PlainConvLSTM)
    assert sum(p.numel() for p in ref.parameters()) == model.num_parameters()
    x = frames(colours)
    for m in (model, ref):
        m.frame_nll(m(x), x).mean().backward()
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), rtol=1e-9, atol=1e-9)
    expected, got = reference_grads_as_fused(ref), fused_grads(model)
    assert set(expected) == set(got)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-10, msg=name)


def test_reference_model_in_fp32_matches_too():
    """The benchmark compares fp32 models; their logits agree within float tolerance."""
    torch.manual_seed(1)
    model = VideoPixelNetwork(tiny_cfg())
    x = frames()
    with torch.no_grad():
        torch.testing.assert_close(reference_model(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_channels_last_gives_the_same_logits_and_training():
    """memory_format only changes strides: same logits, and a Trainer step gives the same loss."""
    torch.manual_seed(2)
    model = VideoPixelNetwork(tiny_cfg())
    x = frames()
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        assert model.decoder.blocks[0].mu1.gates.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)

    data = frames(b=4, t=3)
    losses = {}
    for fmt in ("contiguous", "channels_last"):
        trainer = Trainer(tiny_cfg(), TrainConfig(batch_size=2, context=1, device="cpu", memory_format=fmt), data)
        losses[fmt] = [float(trainer.train_step(data[:2])) for _ in range(3)]
        assert list(trainer.model.state_dict()) == list(VideoPixelNetwork(tiny_cfg()).state_dict())
    assert losses["channels_last"] == pytest.approx(losses["contiguous"], rel=1e-5)


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous", "auto"])
def test_trainer_puts_its_weights_in_the_memory_format_asked_for(fmt):
    """The Trainer's conv weights are NHWC when asked for channels_last (and stay so after a step),
    NCHW otherwise ("auto" is contiguous on a CPU). Only weights with a 3x3 kernel and more than one
    input channel are looked at: for the others the two layouts have the same strides."""
    data = frames(b=4, t=3)
    trainer = Trainer(tiny_cfg(), TrainConfig(batch_size=2, context=1, device="cpu", memory_format=fmt), data)
    want = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    for stage in ("built", "trained"):
        weights = {
            n: p for n, p in trainer.model.named_parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1
        }
        assert len(weights) >= 10  # the encoder's, LSTM's and decoder's 3x3 convs
        for name, weight in weights.items():
            assert weight.is_contiguous(memory_format=want), (stage, name, weight.stride())
            assert not weight.is_contiguous(
                memory_format=torch.channels_last if want == torch.contiguous_format else torch.contiguous_format
            ), (stage, name)
        trainer.train_step(data[:2])


def test_compiled_training_step_matches_eager(monkeypatch):
    """TrainConfig(compile=True) compiles forward + loss, the backward through AOTAutograd: same
    losses, same state_dict keys. The default backend (inductor) takes 15-30 s to compile even this
    one-block model on a 2-core CPU, so the test swaps in backend "aot_eager": the same Dynamo
    capture and AOTAutograd graphs, without the C++ code generation. benchmarks/bench_train.py
    checks inductor's first-step loss against eager at benchmark scale."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, enc_blocks=1, dec_blocks=1)
    data = frames(b=2, t=3, size=6)
    losses, keys = {}, {}
    for compile_ in (False, True):
        trainer = Trainer(cfg, TrainConfig(batch_size=2, context=1, device="cpu", compile=compile_), data)
        assert (trainer._train_nats == trainer._nats) is not compile_  # really compiled, or really not
        losses[compile_] = [float(trainer.train_step(data)) for _ in range(2)]
        keys[compile_] = list(trainer.model.state_dict())
    assert keys[True] == keys[False]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_inductor_compiled_training_step_matches_eager():
    """The default backend, inductor, once: it generates and compiles C++ for the forward and the
    backward (about 40 s on a 2-core CPU, 5 s when its on-disk cache has them). Its losses over 3
    updates match eager's within 1e-4 relative: inductor fuses and reorders float32 arithmetic, so
    the low bits may differ, and the weights it updated feed steps 2 and 3."""
    from torch._dynamo.utils import counters

    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, enc_blocks=1, dec_blocks=1)
    data = frames(b=2, t=3, size=6)
    losses = {}
    counters.clear()
    for compile_ in (False, True):
        trainer = Trainer(cfg, TrainConfig(batch_size=2, context=1, device="cpu", compile=compile_), data)
        assert (trainer._train_nats == trainer._nats) is not compile_
        losses[compile_] = [float(trainer.train_step(data)) for _ in range(3)]
    # inductor made the forward and the backward graph (compiled now, or loaded from its own cache)
    inductor = counters["inductor"]
    assert inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"] + inductor["fxgraph_cache_bypass"] >= 2, dict(
        inductor
    )
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[False][2] < losses[False][0]  # the weights moved: steps 2 and 3 test the updated ones


def test_bf16_cpu_training_tracks_fp32(monkeypatch):
    """cpu_amp (the CPU path that reaches 2x the reference) trains in bf16 autocast: its losses
    differ from fp32's in the low digits, but over 40 steps on the same batches the two runs learn
    alike. The cast is real: the first step's loss is not fp32's bit for bit."""
    monkeypatch.setattr("vpn.train.cpu_has_native_bf16", lambda: True)  # bf16 even where it is emulated
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, enc_blocks=1, dec_blocks=2, output="bernoulli")
    data = torch.zeros(8, 3, 1, 8, 8, dtype=torch.uint8)  # a bright square moving right: learnable
    for i in range(8):
        for t in range(3):
            data[i, t, 0, i % 5 : i % 5 + 3, t + i % 3 : t + i % 3 + 3] = 255
    curves = {}
    for amp in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(cfg, TrainConfig(batch_size=4, context=1, lr=3e-3, device="cpu", cpu_amp=amp), data)
        curves[amp] = [float(trainer.train_step(data[(4 * s) % 8 : (4 * s) % 8 + 4])) for s in range(40)]
    fp32, bf16 = curves[False], curves[True]
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=1e-2)
    assert sum(fp32[-4:]) < 0.1 * sum(fp32[:4])  # it learned something to compare
    assert sum(bf16[5:15]) == pytest.approx(sum(fp32[5:15]), rel=0.03)  # (measured: 48 -> 0.27 nats,
    assert sum(bf16[-4:]) == pytest.approx(sum(fp32[-4:]), rel=0.1)  # the two within 2% throughout)


@pytest.mark.parametrize(
    "overrides,field",
    [({"memory_format": "nhwc"}, "memory_format"), ({"compile": "yes"}, "compile"), ({"cpu_amp": 1}, "cpu_amp")],
)
def test_speed_options_are_validated(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**overrides)


@pytest.mark.parametrize("cfg", [tiny_cfg(), tiny_cfg(image_channels=3, dilation=True), tiny_cfg(output="bernoulli")])
def test_flop_count_is_what_the_plain_model_executes(cfg):
    """flops_per_frame counts every conv's whole kernel once per frame: exactly what the plain
    reference executes per extra frame (T=3 minus T=2: one encode, one LSTM step, one decode)."""
    ref = reference_model(VideoPixelNetwork(cfg))

    def counted(t: int) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ref(frames(cfg.image_channels, b=1, t=t, size=7))
        return counter.get_total_flops()

    assert VideoPixelNetwork(cfg).flops_per_frame(7, 7) == counted(3) - counted(2)


def test_categorical_draw_follows_the_softmax():
    """The inverse-CDF draw: frequencies of 200k draws match the softmax (5 sigma per value), and
    values of zero probability are never drawn."""
    torch.manual_seed(0)
    logits = torch.randn(1, 256) * 2
    p = torch.softmax(logits, dim=-1)[0].double()
    n = 200_000
    values = draw(logits.expand(n, 256), "categorical", 1.0, torch.Generator().manual_seed(0))
    assert values.dtype == torch.uint8 and values.shape == (n,)
    freq = torch.bincount(values.long(), minlength=256).double() / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()

    sparse = torch.full((1000, 256), -1e4)
    sparse[:, [0, 7, 255]] = 0.0
    assert set(draw(sparse, "categorical", 1.0, torch.Generator().manual_seed(1)).tolist()) == {0, 7, 255}
