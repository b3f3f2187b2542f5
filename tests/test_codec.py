"""Wire codecs: sizes, round trips, error feedback, the fused reduce, and the refusal of NaN/Inf."""

import pytest
import torch

from hiveengine.codec import CODECS, BlockwiseCodec, get_codec
from hiveengine.errors import ConfigurationError, NonFiniteError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def randn(n: int, seed: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("none", {}, 4.0),
        ("fp16", {}, 2.0),
        ("bf16", {}, 2.0),
        ("int8", {}, 1 + 4 / 1024),
        ("int8", {"block": 64}, 1 + 4 / 64),
        ("int4", {"block": 256}, 0.5 + 4 / 256),
    ],
)
def test_bytes_per_element_matches_the_payload(name, options, expected):
    codec = get_codec(name, **options)
    assert codec.name == name
    assert codec.bytes_per_element == pytest.approx(expected)
    n = 1 << 16
    payload = codec.encode(randn(n, seed=1))
    assert all(t.is_contiguous() for t in payload)
    nbytes = sum(t.numel() * t.element_size() for t in payload)
    assert nbytes == codec.payload_nbytes(n) == pytest.approx(expected * n)
    assert [(t.shape, t.dtype) for t in codec.empty_payload(n, "cpu")] == [(t.shape, t.dtype) for t in payload]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(device, name, dtype):
    codec = get_codec(name)
    n = 10007
    x = randn(n, seed=2, dtype=dtype, device=device).view(10007, 1)
    out = torch.empty_like(x, dtype=torch.float32)
    assert codec.decode(codec.encode(x, name="x"), out, name="x") is out
    if name == "none":
        assert torch.equal(out, x.float())
    elif name in ("fp16", "bf16"):
        assert torch.equal(out, x.to(codec.dtype).float())
    else:
        values = x.float().view(-1).cpu()
        err = (out.view(-1).cpu() - values).abs()
        scale = values.abs().max() / (127 if name == "int8" else 7)
        # Half a step of the coarsest block, plus the fp32 rounding of the scaling.
        assert bool((err <= scale / 2 + 1e-6 * values.abs()).all())


def test_decode_into_a_bf16_parameter_buffer():
    x = randn(5000, seed=3)
    param = torch.empty(50, 100, dtype=torch.bfloat16)
    codec = get_codec("int8", block=256)
    codec.decode(codec.encode(x), param)
    expected = torch.empty(5000)
    codec.decode(codec.encode(x), expected)
    assert torch.equal(param.view(-1), expected.to(torch.bfloat16))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", [700, 3000, 4096])
def test_decoding_copies_as_rows_is_decoding_each(name, n):
    """A reducer decodes its K copies into the rows of one matrix: bit for bit each decoded alone, partial last block
    included; a non-finite scale is refused, naming the copy."""
    codec = get_codec(name)
    payloads = [codec.encode(randn(n, seed=20 + k) * (10.0**k)) for k in range(5)]
    rows = torch.full((5, n), float("nan"))
    codec.decode_rows(payloads, rows, name="chunk 3")
    assert torch.equal(rows, torch.stack([codec.decode(p, torch.empty(n)) for p in payloads]))
    if codec.frames == 2:
        payloads[2][1][0] = float("inf")
        with pytest.raises(NonFiniteError, match="copy 2 of chunk 3"):
            codec.decode_rows(payloads, rows, name="chunk 3")


@pytest.mark.parametrize("name", CODECS)
def test_encode_reuses_preallocated_buffers(name):
    codec = get_codec(name)
    x = randn(4096, seed=4, dtype=torch.bfloat16)
    buffers = codec.empty_payload(4096, "cpu")
    payload = codec.encode(x, out=buffers)
    assert [t.data_ptr() for t in payload] == [t.data_ptr() for t in buffers]


def test_none_codec_sends_fp32_without_copying():
    x = randn(1000, seed=5)
    (payload,) = get_codec("none").encode(x)
    assert payload.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
def test_float_codecs_refuse_a_residual(name):
    with pytest.raises(ConfigurationError, match="takes no error-feedback residual"):
        get_codec(name).encode(randn(100, seed=6), residual=torch.zeros(100))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_error_feedback_through_the_codec(name):
    codec = get_codec(name, block=128)
    assert codec.supports_error_feedback
    n, steps = 3001, 20
    residual = torch.zeros(n)
    sent = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        x = randn(n, seed=10 + t) + 0.05
        decoded = torch.empty(n)
        codec.decode(codec.encode(x, residual), decoded)
        sent += decoded.double()
        total += x.double()
    assert torch.allclose(total - sent, residual.double(), atol=1e-4)
    assert float((total - sent).abs().max()) < 0.5


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("requantize", [False, True])
def test_reduce_is_the_weighted_mean_of_decoded_payloads(name, requantize):
    codec = get_codec(name)
    n, weights = 20001, [1.0, 3.0, 0.5, 2.0]
    payloads = [codec.encode(randn(n, seed=20 + i)) for i in range(len(weights))]
    decoded = []
    for p in payloads:
        decoded.append(torch.empty(n))
        codec.decode(p, decoded[-1])
    out = torch.empty(n)
    back = codec.reduce(payloads, weights, out, requantize=requantize, name="part0")
    exact = sum(w * d.double() for w, d in zip(weights, decoded, strict=True)) / sum(weights)
    assert float((out.double() - exact).abs().max()) <= 1e-6 * float(exact.abs().max())
    if not requantize:
        assert back is None
        return
    returned = torch.empty(n)
    codec.decode(back, returned)
    reencoded = torch.empty(n)
    codec.decode(codec.encode(out), reencoded)
    assert torch.equal(returned, reencoded)


def test_butterfly_round_gives_every_peer_the_same_average():
    """Four peers each own a quarter: they send quantized parts, the owner reduces and sends back the mean."""
    codec = get_codec("int8", block=256)
    peers, n = 4, 40000
    grads = [randn(n, seed=30 + p) for p in range(peers)]
    residuals = [torch.zeros(n) for _ in range(peers)]
    parts = [slice(i * n // peers, (i + 1) * n // peers) for i in range(peers)]
    averaged = [torch.empty(n) for _ in range(peers)]
    for part in parts:
        sent = [codec.encode(grads[p][part], residuals[p][part].contiguous()) for p in range(peers)]
        mean = torch.empty(part.stop - part.start)
        back = codec.reduce(sent, [1.0] * peers, mean, requantize=True, name=f"part {part}")
        for p in range(peers):
            codec.decode(back, averaged[p][part])
    truth = sum(grads) / peers
    for p in range(1, peers):
        assert torch.equal(averaged[p], averaged[0])
    assert float((averaged[0] - truth).abs().max()) < 4 * float(truth.abs().max()) / 127


@pytest.mark.parametrize("name", CODECS)
def test_nan_gradient_is_refused_on_encode(name):
    x = randn(3000, seed=40)
    x[17] = float("nan")
    with pytest.raises(NonFiniteError, match=r"blocks\.3\.mlp\.grad"):
        get_codec(name).encode(x, name="blocks.3.mlp.grad")


@pytest.mark.parametrize("name", CODECS)
def test_corrupt_peer_payload_is_refused_on_reduce(name):
    codec = get_codec(name)
    payloads = [codec.encode(randn(3000, seed=50 + i)) for i in range(3)]
    corrupt = payloads[1][-1]  # the values of float codecs, the scales of blockwise ones
    corrupt[2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"\[1\] of part3"):
        codec.reduce(payloads, [1, 1, 1], torch.empty(3000), name="part3")
    with pytest.raises(NonFiniteError):
        codec.decode(payloads[1], torch.empty(3000))


def test_fp16_codec_refuses_values_it_cannot_represent():
    with pytest.raises(NonFiniteError, match="overflows"):
        get_codec("fp16").encode(torch.tensor([1.0, 1e6]))
    assert get_codec("bf16").encode(torch.tensor([1.0, 1e6]))[0].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("int2", {}, "unknown codec"),
        ("fp16", {"block": 64}, "takes no options"),
        ("int8", {"block": 100}, "power of two"),
        ("int4", {"blocks": 64}, "block= and stochastic="),
    ],
)
def test_bad_codec_choices(name, options, match):
    with pytest.raises(ConfigurationError, match=match):
        get_codec(name, **options)


def test_stochastic_blockwise_codec_is_an_option():
    codec = get_codec("int4", block=64, stochastic=True)
    assert isinstance(codec, BlockwiseCodec) and codec.stochastic
    assert "stochastic=True" in repr(codec)
    x = randn(1000, seed=60)
    assert not torch.equal(codec.encode(x)[0], get_codec("int4", block=64).encode(x)[0])


def reference_centered_clip(rows: torch.Tensor, weights: list[float], tau_factor: float, iterations: int):
    """CenteredClip written plainly in float64 on the full vectors: from the medoid, tau = tau_factor times the
    median distance of the other copies to it."""
    x = rows.double()
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    k = len(x)
    others = torch.cdist(x, x)[~torch.eye(k, dtype=torch.bool)].view(k, k - 1)  # each copy's distances to the others
    start = int(others.median(dim=1).values.argmin())
    tau = tau_factor * float(others[start].median())
    v = x[start].clone()
    for _ in range(iterations):
        d = (x - v).norm(dim=1)
        v = v + ((w * torch.clamp(tau / d, max=1.0))[:, None] * (x - v)).sum(0)
    return v


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_centered_clip_matches_a_torch_reference_on_fresh_data(seed):
    from hiveengine.codec import Aggregation, centered_clip

    gen = torch.Generator().manual_seed(seed)
    k, n = 7, 5000
    rows = torch.randn(k, n, generator=gen)
    rows[:2] = rows[:2] * torch.tensor([[300.0], [-50.0]]) + 7  # two hostile copies: scaled, flipped, shifted
    weights = (torch.rand(k, generator=gen) + 0.5).tolist()
    aggregation = Aggregation("centered_clip", iterations=200)
    expected = reference_centered_clip(rows, weights, aggregation.tau_factor, 200)
    out = torch.empty(n)
    assert centered_clip(rows.clone(), weights, out, aggregation)
    assert torch.allclose(out.double(), expected, atol=1e-3, rtol=0)
    honest = rows[2:].mean(0)
    assert float((out - honest).norm()) < float((rows[2:] - honest).norm(dim=1).max())


@pytest.mark.parametrize("name", CODECS)
def test_centered_clip_is_the_exact_mean_on_clean_copies_and_bounded_under_attack(name):
    from hiveengine.codec import Aggregation

    codec = get_codec(name)
    n, clip = 4096, Aggregation("centered_clip")
    copies = [randn(n, seed=10 + i) for i in range(5)]
    payloads = [codec.encode(x) for x in copies]
    mean, robust = torch.empty(n), torch.empty(n)
    codec.reduce(payloads, [1.0, 2.0, 1.0, 1.0, 1.5], mean)
    codec.reduce(payloads, [1.0, 2.0, 1.0, 1.0, 1.5], robust, aggregation=clip)
    assert torch.equal(mean, robust)  # nothing to clip: the fused mean, bit for bit
    honest = torch.stack(copies[:4]).mean(0)
    spread = float((torch.stack(copies[:4]) - honest).norm(dim=1).max())
    payloads[4] = codec.encode(copies[4] * 1000 if name != "fp16" else copies[4] * 100)
    reply = codec.reduce(payloads, [1.0] * 5, robust, aggregation=clip, requantize=True)
    codec.decode(reply, mean)
    assert float((robust - honest).norm()) < spread
    steps = 7 if name == "int4" else 100  # the reply is the aggregate, up to one quantization
    assert float((mean - robust).abs().max()) <= float(robust.abs().max()) / steps


@pytest.mark.parametrize("norm", [1e10, 3e19, 1e30])
@pytest.mark.parametrize("at", [0, 4, 7])
def test_centered_clip_bounds_a_copy_of_any_size_wherever_it_sits(norm, at):
    # A copy of norm 1e10 sitting first was the base every difference was taken to, in fp32: the honest copies' own
    # values rounded away, and the result lay as far from their mean as that mean from zero. Past ~2e19 the fp32
    # Gram product overflowed, the distances came out NaN, and the copy went unclipped (coefficient 0.93).
    from hiveengine.codec import Aggregation, centered_clip

    n = 4096
    honest = [randn(n, seed=90 + i) + 1.0 for i in range(7)]
    hostile = randn(n, seed=99)
    hostile *= norm / float(hostile.double().norm())
    rows = torch.stack([*honest[:at], hostile, *honest[at:]])
    out = torch.empty(n)
    coefficients = centered_clip(rows.clone(), [1.0] * 8, out, Aggregation("centered_clip"))
    assert coefficients is not None and abs(sum(coefficients) - 1) < 1e-6 and min(coefficients) >= 0
    mean = torch.stack(honest).mean(0)
    spread = float((torch.stack(honest) - mean).norm(dim=1).max())
    assert float((out - mean).norm()) < spread / 2
    assert coefficients[at] * norm < spread  # it pulls with about tau / 8, whatever its size
    combined = sum(c * r.double() for c, r in zip(coefficients, rows, strict=True))
    assert float((combined - out.double()).norm()) <= 1e-4 * float(mean.norm())  # the claim a verifier checks


@pytest.mark.parametrize(("honest", "colluders", "weight"), [(4, 3, 1.0), (6, 4, 1.0), (6, 2, 2.0), (5, 3, 1.15)])
def test_colluders_with_40_percent_of_the_weight_cannot_pass_as_a_clean_round(honest, colluders, weight):
    # Colluders that share one copy D away drag the mean by a D (a: their weight's share), so the honest copies sit
    # about a D from it. The clean-round check took its tau from those distances to the mean: from a = 40% on, every
    # copy lay within 1.5 median distances of the mean, the plain mean was returned, and D moved it without bound.
    from hiveengine.codec import Aggregation, centered_clip

    n = 1000
    rows = torch.stack([randn(n, seed=300 + i) for i in range(honest)] + [randn(n, seed=399) + 1e4] * colluders)
    weights = [1.0] * honest + [weight] * colluders
    out = torch.empty(n)
    coefficients = centered_clip(rows, weights, out, Aggregation("centered_clip"))
    assert coefficients is not None  # not taken for a clean round
    good = rows[:honest].mean(0)
    spread = float((rows[:honest] - good).norm(dim=1).max())
    assert float((out - good).norm()) < 2 * spread  # bounded by tau, not by the colluders' 1e4 per value


def test_copies_that_mostly_coincide_keep_a_positive_radius():
    # Most copies equal (zero gradients, frozen values): the medoid's median distance is 0, and a radius of 0 gave
    # every other copy a coefficient of 0, which each of their honest senders took for a reducer dropping its copy.
    from hiveengine.codec import Aggregation, centered_clip

    n = 2000
    rows = torch.cat([torch.zeros(5, n), 0.01 * torch.stack([randn(n, seed=500 + i) for i in range(2)])])
    rows = torch.cat([rows, 1e3 * randn(n, seed=510).unsqueeze(0)])  # and one huge copy
    out = torch.empty(n)
    coefficients = centered_clip(rows, [1.0] * 8, out, Aggregation("centered_clip"))
    assert coefficients is not None and min(coefficients) > 0 and abs(sum(coefficients) - 1) < 1e-6
    assert float(out.norm()) < float(rows[5:7].norm(dim=1).max())  # the huge copy is still clipped


def test_centered_clip_refuses_non_finite_copies_and_options():
    from hiveengine.codec import Aggregation

    codec = get_codec("none")
    copies = [randn(100, seed=i) for i in range(3)]
    copies[1][5] = float("nan")
    with pytest.raises(NonFiniteError):
        codec.reduce([[c] for c in copies], [1.0] * 3, torch.empty(100), aggregation=Aggregation("centered_clip"))
    for bad in ({"kind": "median"}, {"tau": -1.0}, {"tau_factor": 0.5}, {"iterations": 0}):
        with pytest.raises(ConfigurationError):
            Aggregation(**bad)
