"""PyTorch reference for bench/run.exs: the same cases, the same method, the same keys.

    python3 bench/reference/torch_bench.py [--device cuda|cpu] [--quick] [suite ...]

Suites: dispatch, matmul, elementwise, transformer, mlp, blas, fast, decode (bench/README.md defines the
cases; blas is the raw bench's model-shaped f32 matmuls, for bench/compare-blas).
On the CPU, PyTorch runs with as many threads as the machine has cores.
Each case is timed as in bench/run.exs: warm-up runs, then timed runs (at least 5, at most
20, or until 3 s have passed), each ending with torch.cuda.synchronize(); the median and the
10th and 90th percentiles in milliseconds. PyTorch runs eagerly, with its own fused kernels
where a PyTorch user would call them (softmax, layer_norm, gelu); TF32 stays off (PyTorch's
default for matmul), so f32 matmuls are full f32. The transformer block also runs with its
attention as F.scaled_dot_product_attention, keyed `sdpa.<case>`.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

HIDDEN, HEADS, FF = 768, 12, 3072


class Settings:
    def __init__(self, quick):
        if quick:
            self.warmup, self.min_reps, self.max_reps, self.budget = 1, 3, 5, 0.5
        else:
            self.warmup, self.min_reps, self.max_reps, self.budget = 3, 5, 20, 3.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(s, device, fn):
    for _ in range(s.warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < s.min_reps or (
        len(times) < s.max_reps and time.perf_counter() - start < s.budget
    ):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    at = lambda q: times[round((len(times) - 1) * q)]
    return at(0.5), at(0.1), at(0.9)


def emit(key, t, amount=None, unit=None):
    med, p10, p90 = t
    print(f"{key}_ms: {med:.4f}")
    print(f"{key}_ms_p10: {p10:.4f}")
    print(f"{key}_ms_p90: {p90:.4f}")
    if amount is not None:
        print(f"{key}_{unit}: {amount / (med / 1e3) / 1e9:.2f}")


def uniform(shape, dtype, seed, scale, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = (torch.rand(shape, generator=g) * 2 - 1) * scale
    return t.to(device=device, dtype=dtype)


NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def dispatch(s, device):
    a = torch.arange(16, dtype=torch.float32, device=device)
    b = torch.ones(16, dtype=torch.float32, device=device)
    for _ in range(200):
        (a + b).cpu()
    chain = 2000
    per_op = []
    for _ in range(15):
        t0 = time.perf_counter()
        x = a
        for _ in range(chain):
            x = x + b
        per_op.append((time.perf_counter() - t0) * 1e6 / chain)
        sync(device)
    readback = []
    for _ in range(2000):
        t0 = time.perf_counter()
        (a + b).cpu()
        readback.append((time.perf_counter() - t0) * 1e6)
    per_op.sort()
    readback.sort()
    print(f"dispatch_us: {per_op[len(per_op) // 2]:.3f}")
    print(f"readback_us: {readback[len(readback) // 2]:.3f}")


def matmul(s, device):
    if device.type == "cuda":
        cases = [(d, n) for d in (torch.bfloat16, torch.float16, torch.float32) for n in (1024, 2048, 4096, 8192)]
    else:
        cases = [(torch.float32, n) for n in (256, 512, 1024, 2048)]
    for dtype, n in cases:
        a = uniform((n, n), dtype, 1, 1.0, device)
        b = uniform((n, n), dtype, 2, 1.0, device)
        t = measure(s, device, lambda: a @ b)
        emit(f"matmul_{NAMES[dtype]}_{n}", t, 2 * n**3, "gflops")


def elementwise(s, device):
    n, label = (64 << 20, "64m") if device.type == "cuda" else (16 << 20, "16m")
    a = uniform((n,), torch.float32, 3, 1.0, device)
    b = uniform((n,), torch.float32, 4, 1.0, device)
    rows = a.reshape(n // 4096, 4096)
    for name, k, fn in (
        ("add", 3, lambda: a + b),
        ("exp", 2, lambda: torch.exp(a)),
        ("sum", 1, lambda: torch.sum(a)),
        ("softmax", 2, lambda: torch.softmax(rows, dim=-1)),
        ("gelu", 2, lambda: F.gelu(a)),
    ):
        emit(f"{name}_f32_{label}", measure(s, device, fn), k * n * 4, "gbps")


def block_params(dtype, device):
    w = lambda shape, seed: uniform(shape, dtype, seed, 0.02, device)
    return dict(
        wq=w((HIDDEN, HIDDEN), 10), bq=w((HIDDEN,), 11),
        wk=w((HIDDEN, HIDDEN), 12), bk=w((HIDDEN,), 13),
        wv=w((HIDDEN, HIDDEN), 14), bv=w((HIDDEN,), 15),
        wo=w((HIDDEN, HIDDEN), 16), bo=w((HIDDEN,), 17),
        w1=w((HIDDEN, FF), 18), b1=w((FF,), 19),
        w2=w((FF, HIDDEN), 20), b2=w((HIDDEN,), 21),
        g1=w((HIDDEN,), 22), beta1=w((HIDDEN,), 23),
        g2=w((HIDDEN,), 24), beta2=w((HIDDEN,), 25),
    )


def block(x, p, sdpa=False):
    bsz, seq, _ = x.shape
    hd = HIDDEN // HEADS
    h = F.layer_norm(x, (HIDDEN,), p["g1"], p["beta1"], eps=1e-5)
    heads = lambda t: t.reshape(bsz, seq, HEADS, hd).transpose(1, 2)
    q = heads(h @ p["wq"] + p["bq"])
    k = heads(h @ p["wk"] + p["bk"])
    v = heads(h @ p["wv"] + p["bv"])
    if sdpa:
        ctx = F.scaled_dot_product_attention(q, k, v)
    else:
        scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(hd))
        ctx = torch.softmax(scores, dim=-1) @ v
    ctx = ctx.transpose(1, 2).reshape(bsz, seq, HIDDEN)
    x1 = x + (ctx @ p["wo"] + p["bo"])
    f = F.layer_norm(x1, (HIDDEN,), p["g2"], p["beta2"], eps=1e-5) @ p["w1"] + p["b1"]
    return x1 + (F.gelu(f) @ p["w2"] + p["b2"])


def transformer(s, device):
    if device.type == "cuda":
        cases = [(torch.float32, 1, 128), (torch.bfloat16, 1, 128), (torch.float32, 8, 512), (torch.bfloat16, 8, 512)]
    else:
        cases = [(torch.float32, 1, 128)]
    for dtype, bsz, seq in cases:
        p = block_params(dtype, device)
        x = uniform((bsz, seq, HIDDEN), dtype, 30, 1.0, device)
        key = f"transformer_{bsz}x{seq}x{HIDDEN}_{NAMES[dtype]}"
        with torch.no_grad():
            emit(key, measure(s, device, lambda: block(x, p)))
            # The same block with the attention as F.scaled_dot_product_attention.
            emit(f"sdpa.{key}", measure(s, device, lambda: block(x, p, sdpa=True)))
    if device.type == "cpu":
        # A BERT-base-shaped forward: the block 12 times (one set of weights), seq 128.
        p = block_params(torch.float32, device)
        x = uniform((1, 128, HIDDEN), torch.float32, 30, 1.0, device)

        def encoder12():
            h = x
            for _ in range(12):
                h = block(h, p)
            return h

        with torch.no_grad():
            emit(f"encoder12_1x128x{HIDDEN}_f32", measure(s, device, encoder12))


def mlp(s, device):
    cases = [
        ("mlp4_b8_small", torch.float32, 8, [64, 128, 128, 128, 10]),
        ("mlp4_b128", torch.float32, 128, [784, 2048, 2048, 2048, 10]),
    ]
    if device.type == "cuda":
        cases.append(("mlp4_b128", torch.bfloat16, 128, [784, 2048, 2048, 2048, 10]))
    for name, dtype, batch, widths in cases:
        layers = [
            (uniform((i, o), dtype, 40 + n, 0.05, device), uniform((o,), dtype, 50 + n, 0.05, device))
            for n, (i, o) in enumerate(zip(widths, widths[1:]))
        ]
        x = uniform((batch, widths[0]), dtype, 60, 1.0, device)

        def run():
            h = x
            for n, (w, b) in enumerate(layers):
                h = h @ w + b
                if n < len(layers) - 1:
                    h = torch.relu(h)
            return h

        with torch.no_grad():
            emit(f"{name}_{NAMES[dtype]}", measure(s, device, run))


# mlx_raw_bench's `blas` suite: (name, batch, m, k, n) of [batch, m, k] x [batch, k, n].
BLAS_CASES = [
    ("square_1024", 1, 1024, 1024, 1024),
    ("square_2048", 1, 2048, 2048, 2048),
    ("qkv_128x768x2304", 1, 128, 768, 2304),
    ("ffn_up_128x768x3072", 1, 128, 768, 3072),
    ("ffn_down_128x3072x768", 1, 128, 3072, 768),
    ("ffn_up_4096x768x3072", 1, 4096, 768, 3072),
    ("decode_1x768x3072", 1, 1, 768, 3072),
    ("decode_8x768x3072", 1, 8, 768, 3072),
    ("heads_12x128x64x128", 12, 128, 64, 128),
]


def blas(s, device):
    for name, batch, m, k, n in BLAS_CASES:
        lead = (batch,) if batch > 1 else ()
        a = uniform(lead + (m, k), torch.float32, 1, 1.0, device)
        b = uniform(lead + (k, n), torch.float32, 2, 1.0, device)
        emit(f"blas.{name}", measure(s, device, lambda: a @ b), 2 * batch * m * k * n, "gflops")


def fast(s, device):
    """NxMlx.Fast's cases with PyTorch's fused ops (rope: the composed form PyTorch models use)."""
    if device.type == "cuda":
        dtype, bsz, seq = torch.bfloat16, 8, 512
    else:
        dtype, bsz, seq = torch.float32, 1, 128
    t = NAMES[dtype]
    hd = HIDDEN // HEADS
    x = uniform((bsz, seq, HIDDEN), dtype, 70, 1.0, device)
    w = uniform((HIDDEN,), dtype, 71, 1.0, device)
    b = uniform((HIDDEN,), dtype, 72, 1.0, device)
    q = uniform((bsz, HEADS, seq, hd), dtype, 73, 1.0, device)
    k = uniform((bsz, HEADS, seq, hd), dtype, 74, 1.0, device)
    v = uniform((bsz, HEADS, seq, hd), dtype, 75, 1.0, device)
    scores = uniform((bsz, HEADS, seq, seq), dtype, 76, 4.0, device)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    theta = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv
    cos, sin = theta.cos().to(dtype), theta.sin().to(dtype)

    def rope():
        x1, x2 = q[..., : hd // 2], q[..., hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    shape = f"{bsz}x{seq}x{HIDDEN}_{t}"
    heads = f"{bsz}x{HEADS}x{seq}x{hd}_{t}"
    with torch.no_grad():
        emit(f"rms_norm_{shape}", measure(s, device, lambda: F.rms_norm(x, (HIDDEN,), w, eps=1e-5)))
        emit(f"layer_norm_{shape}", measure(s, device, lambda: F.layer_norm(x, (HIDDEN,), w, b, eps=1e-5)))
        emit(f"softmax_{bsz}x{HEADS}x{seq}x{seq}_{t}", measure(s, device, lambda: torch.softmax(scores, dim=-1)))
        emit(f"rope_{heads}", measure(s, device, rope))
        emit(f"sdpa_causal_{heads}", measure(s, device, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))


VOCAB, LAYERS = 50257, 12


def gpt2_params(dtype, device):
    w = lambda shape, seed: uniform(shape, dtype, seed, 0.02, device)
    ones = lambda seed: (w((HIDDEN,), seed).float() + 1.0).to(dtype)
    layers = []
    for i in range(LAYERS):
        s = 100 + 20 * i
        layers.append(dict(
            ln1_g=ones(s), ln1_b=w((HIDDEN,), s + 1),
            qkv_w=w((HIDDEN, 3 * HIDDEN), s + 2), qkv_b=w((3 * HIDDEN,), s + 3),
            proj_w=w((HIDDEN, HIDDEN), s + 4), proj_b=w((HIDDEN,), s + 5),
            ln2_g=ones(s + 6), ln2_b=w((HIDDEN,), s + 7),
            fc_w=w((HIDDEN, FF), s + 8), fc_b=w((FF,), s + 9),
            out_w=w((FF, HIDDEN), s + 10), out_b=w((HIDDEN,), s + 11),
        ))
    wte = w((VOCAB, HIDDEN), 90)
    return dict(wte=wte, wpe=w((1024, HIDDEN), 91), lnf_g=ones(92), lnf_b=w((HIDDEN,), 93),
                head=wte.t().contiguous(), layers=layers)


def gpt2_forward(tokens, pos, caches, p):
    """bench/run.exs's decode model: pre-LN layers, tanh GELU, F.scaled_dot_product_attention
    over a static KV cache (preallocated, written in place, attended up to its filled part)."""
    n = tokens.shape[1]
    hd = HIDDEN // HEADS
    x = p["wte"][tokens] + p["wpe"][pos:pos + n][None]
    for l, (kc, vc) in zip(p["layers"], caches):
        h = F.layer_norm(x, (HIDDEN,), l["ln1_g"], l["ln1_b"], eps=1e-5)
        qkv = h @ l["qkv_w"] + l["qkv_b"]
        q, k, v = (t.reshape(1, n, HEADS, hd).transpose(1, 2) for t in qkv.split(HIDDEN, dim=-1))
        kc[:, :, pos:pos + n] = k
        vc[:, :, pos:pos + n] = v
        a = F.scaled_dot_product_attention(q, kc[:, :, :pos + n], vc[:, :, :pos + n], is_causal=n > 1)
        x = x + (a.transpose(1, 2).reshape(1, n, HIDDEN) @ l["proj_w"] + l["proj_b"])
        h = F.layer_norm(x, (HIDDEN,), l["ln2_g"], l["ln2_b"], eps=1e-5)
        x = x + (F.gelu(h @ l["fc_w"] + l["fc_b"], approximate="tanh") @ l["out_w"] + l["out_b"])
    h = F.layer_norm(x[:, -1], (HIDDEN,), p["lnf_g"], p["lnf_b"], eps=1e-5)
    return torch.argmax(h @ p["head"], dim=-1, keepdim=True)


def decode(s, device):
    """GPT-2-small-shaped greedy generation: a 128-token prompt, then 128 new tokens."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt, new = 128, 128
    p = gpt2_params(dtype, device)
    tokens = (torch.arange(prompt, device=device) % VOCAB)[None]
    hd = HIDDEN // HEADS

    def generate():
        caches = [(torch.zeros(1, HEADS, prompt + new, hd, dtype=dtype, device=device),
                   torch.zeros(1, HEADS, prompt + new, hd, dtype=dtype, device=device))
                  for _ in range(LAYERS)]
        token = gpt2_forward(tokens, 0, caches, p)
        for i in range(new - 1):
            token = gpt2_forward(token, prompt + i, caches, p)
        return token

    with torch.no_grad():
        emit(f"decode_gpt2s_{NAMES[dtype]}", measure(s, device, generate))


SUITES = {"dispatch": dispatch, "matmul": matmul, "elementwise": elementwise, "transformer": transformer, "mlp": mlp, "blas": blas, "fast": fast, "decode": decode}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("suites", nargs="*", default=[])
    args = parser.parse_args()
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}; known: {list(SUITES)}")
    device = torch.device(args.device)
    s = Settings(args.quick)
    print("impl: pytorch")
    print(f"torch_version: {torch.__version__}")
    if device.type == "cuda":
        print(f"torch_gpu: {torch.cuda.get_device_name(0)}")
        print(f"torch_cuda: {torch.version.cuda}")
    else:
        # As many threads as the machine has cores (PyTorch's default may count only
        # physical ones); NxMlx's OpenBLAS uses them all too.
        torch.set_num_threads(os.cpu_count())
        print(f"torch_threads: {torch.get_num_threads()}")
        print(f"torch_cpu_capability: {torch.backends.cpu.get_cpu_capability()}")
    for name in args.suites or list(SUITES):
        SUITES[name](s, device)


if __name__ == "__main__":
    main()
