"""Global-temperature samplers against length and temperature, at equal compute.

For each model, budget L (max_new_tokens) and temperature T, every method draws k = 16 samples for
each of P prompts with about the same compute: ``--budget`` times k * L row-tokens decoded per
prompt (a forward of A rows by one token counts A; ``GenerationOutput.decoded_tokens``). Plain
sampling of the same k samples costs at most k * L (less when responses end early; its measured
cost is printed too). Reported per method, averaged over prompts:

- distinct: distinct token sequences among the k samples;
- lineages: distinct first-token draws they descend from (``spl/global_temperature.py``);
- ESS / n: the final weights' effective sample size, and its lowest value over steps;
- TV: on ``markov`` only, where the exact target is known at every length: the mean over positions
  of the total variation between the samples' token distribution at that position and the exact
  one (an "ended" symbol included), next to the noise floor, the same statistic for as many exact
  samples (averaged over 5 draws);
- cost: row-tokens decoded / (k * L), and / plain sampling's own cost; wall seconds.

Models:
- ``markov``: a tiny Mistral (1 layer, V = 16) whose attention and MLP outputs are zero, so the
  next-token distribution depends on the last token only. pi_T is then a Markov chain's power, and
  dynamic programming gives its exact marginals and exact samples (``ExactMarkov``); the global
  and token-level targets still differ (each step's Z depends on the token).
- ``random``: a tiny random Mistral (2 layers, dim 64, V = 64, lm_head x4: about 3 nats per token,
  EOS id 0 ends plain samples after ~19 tokens while pi_T at T > 1 prefers long ones).
- ``demo``: the demo checkpoint (``runs/demo``, from ``python train.py``), its four questions.

    python benchmarks/bench_global_temperature.py --models markov,random,demo [--lengths 8,32,128,256]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from spl.config import ModelConfig
from spl.global_temperature import importance_resample, sample_global_temperature, smc_sample
from spl.model import Transformer
from spl.sampling import generate

K = 16  # samples per prompt


def markov_model(vocab_size: int = 16, scale: float = 3.0) -> Transformer:
    cfg = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                      vocab_size=vocab_size, rope_theta=1e4, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 1)
        model.lm_head.weight.mul_(scale)
        for layer in model.layers:  # no attention, no MLP: logits = lm_head(norm(last token's embedding))
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def random_model() -> Transformer:
    cfg = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                      vocab_size=64, rope_theta=1e4, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 1)
        model.lm_head.weight.mul_(4)
    return model


class ExactMarkov:
    """pi(y)^(1/T) / Z over responses of at most L tokens of a bigram model, started after token s0.

    With W = p^(1/T) (V, V), e = W[:, eos] and M = W without the eos column, the weight of all
    completions after s tokens ending in token i is beta_s(i) = e_i + sum_j M_ij beta_{s+1}(j), with
    beta_L = 1 (cut at the budget), and Z = beta_0(s0). Forward weights alpha give the marginals.
    """

    def __init__(self, model: Transformer, s0: int, L: int, T: float, eos: int):
        V = model.cfg.vocab_size
        with torch.no_grad():
            tokens = torch.arange(V, device=model.lm_head.weight.device)[:, None]  # (V, 1)
            logp = model(tokens)[:, -1].double().log_softmax(-1).cpu()  # (V, V) log p(j | i)
        W = (logp / T).exp()
        self.e, self.M = W[:, eos].clone(), W.clone()
        self.M[:, eos] = 0
        self.beta = torch.ones(L + 1, V, dtype=torch.float64)  # (L + 1, V)
        for s in range(L - 1, -1, -1):
            self.beta[s] = self.e + self.M @ self.beta[s + 1]
        self.V, self.L, self.eos, self.s0, self.W = V, L, eos, s0, W
        self.Z = self.beta[0, s0]

    def marginals(self) -> torch.Tensor:
        """(L, V + 1): probability of each token at each position; column V: ended before it."""
        out = torch.zeros(self.L, self.V + 1, dtype=torch.float64)
        alpha = torch.zeros(self.V, dtype=torch.float64)
        alpha[self.s0] = 1
        ended = 0.0
        for s in range(self.L):
            stop = float((alpha * self.e).sum() / self.Z)
            alpha = alpha @ self.M  # (V,) weight of prefixes of s + 1 tokens, none eos
            out[s, :self.V] = alpha * self.beta[s + 1] / self.Z
            out[s, self.eos], out[s, self.V] = stop, ended
            ended += stop
        return out

    def sample(self, m: int, generator: torch.Generator) -> list[list[int]]:
        """m exact samples: transitions W_ij beta_{s+1}(j) / beta_s(i) (an h-transform)."""
        state = torch.full((m,), self.s0)
        alive = torch.ones(m, dtype=torch.bool)
        out = [[] for _ in range(m)]
        for s in range(self.L):
            w = self.W[state] * self.beta[s + 1]  # (m, V)
            w[:, self.eos] = self.e[state]
            nxt = torch.multinomial(w, 1, generator=generator).squeeze(1)
            for i in alive.nonzero().squeeze(1).tolist():
                out[i].append(int(nxt[i]))
            alive &= nxt != self.eos
            state = torch.where(alive, nxt, state)
        return out


def marginal_table(samples: list[list[int]], L: int, V: int) -> torch.Tensor:
    out = torch.zeros(L, V + 1, dtype=torch.float64)
    for y in samples:
        for s in range(L):
            out[s, y[s] if s < len(y) else V] += 1
    return out / len(samples)


def mean_tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum(-1).mean())


def methods(budget: float, length: int) -> dict:
    """name -> sampler call. ``resample`` and ``smc`` get n = budget x k candidates (one row-token per
    candidate and step); ``smc n=2k`` and ``resample-move`` share 2k particles, so the pair shows
    what rejuvenation buys at fixed memory, and at what compute (each move from position j at
    step t costs t - j + 1 row-tokens per particle: it is left out beyond 128 tokens, where that
    reaches ~50-100 x k L); ``auto`` is what ``sample.py --global-temp T`` runs by default."""
    n = int(budget * K)
    calls = {
        "resample": lambda *a, **kw: importance_resample(*a, num_candidates=n, **kw),
        "smc": lambda *a, **kw: smc_sample(*a, num_candidates=n, moves=0, **kw),
        "smc n=2k": lambda *a, **kw: smc_sample(*a, num_candidates=2 * K, moves=0, **kw),
        "resample-move n=2k": lambda *a, **kw: smc_sample(*a, num_candidates=2 * K, moves=1, **kw),
        "auto (default)": lambda *a, **kw: sample_global_temperature(*a, **kw),
    }
    if length > 128:
        del calls["resample-move n=2k"]
    return calls


def run(model, prompts, eos, L, T, budget, exact=None, names=None):
    plain = generate(model, prompts, max_new_tokens=L, num_samples=K, eos_id=eos, seed=0)
    plain_cost = plain.decoded_tokens.double().mean()
    floor = None
    if exact is not None:
        g = torch.Generator().manual_seed(0)
        floor = sum(mean_tv(marginal_table(exact.sample(len(prompts) * K, g), L, exact.V), exact.table)
                    for _ in range(5)) / 5  # the same statistic for exact samples: the noise floor
    rows = []
    for name, fn in methods(budget, L).items():
        if names and name not in names:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(model, prompts, T, max_new_tokens=L, num_samples=K, eos_id=eos, seed=0)
        seconds = time.perf_counter() - start
        n = out.num_candidates
        tv = mean_tv(marginal_table(out.tokens, L, exact.V), exact.table) if exact is not None else None
        cost = out.decoded_tokens.double().mean()
        rows.append(dict(method=name, n=n, distinct=float(out.distinct_samples.float().mean()),
                         lineages=float(out.distinct_lineages.float().mean()),
                         ess=float(out.ess.mean() / n), min_ess=float(out.min_step_ess.mean() / n),
                         tv=tv, floor=floor, cost_kl=float(cost / (K * L)),
                         cost_plain=float(cost / plain_cost), seconds=seconds))
    return rows


def fmt(model_name, L, T, r) -> str:
    tv = f"{r['tv']:.3f} ({r['floor']:.3f})" if r["tv"] is not None else "-"
    return (f"| {model_name} | {L} | {T:g} | {r['method']} | {r['n']} | {r['distinct']:.1f} | "
            f"{r['lineages']:.1f} | {r['ess']:.2f} / {r['min_ess']:.2f} | {tv} | {r['cost_kl']:.1f} | "
            f"{r['cost_plain']:.1f} | {r['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="markov,random,demo")
    parser.add_argument("--lengths", default="8,32,128,256")
    parser.add_argument("--temperatures", default="0.5,1.5,2")
    parser.add_argument("--budget", type=float, default=8.0, help="row-tokens per prompt / (k * L)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per setting (markov, random)")
    parser.add_argument("--methods", default="", help="comma list to run a subset")
    parser.add_argument("--demo", default="runs/demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the demo loads in fp32 either way)")
    parser.add_argument("--append", default=None, help="markdown file to append the table to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]
    lines = ["| model | L | T | method | n | distinct of 16 | lineages | ESS / n (final / min) | "
             "TV (floor) | cost / kL | cost / plain | s |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for model_name in args.models.split(","):
        if model_name == "demo":
            if not (Path(args.demo) / "checkpoints").is_dir():
                print(f"(skipping demo: {args.demo} not found; build it with `python train.py`)")
                continue
            from spl.demo_answers import demo_questions
            from spl.inference import load_for_inference
            from spl.lora import merge
            loaded = load_for_inference(args.demo, device=args.device)
            if loaded.has_adapter:
                merge(loaded.model)
            model, eos = loaded.model, loaded.tokenizer.eos_id
            prompts = [loaded.tokenizer.encode(q.prompt(), bos=True) for q in demo_questions()]
        else:
            model = (markov_model() if model_name == "markov" else random_model()).to(args.device)
            eos = 0
            prompts = [[1, 2 + i % 8] for i in range(args.prompts)]
            if model_name == "markov":  # one start token, so every prompt shares one exact target
                prompts = [[1, 5]] * args.prompts
        for L in (int(x) for x in args.lengths.split(",")):
            if max(len(p) for p in prompts) + L > model.cfg.max_seq_len:
                print(f"(skipping {model_name} L={L}: beyond its context of {model.cfg.max_seq_len})")
                continue
            for T in (float(x) for x in args.temperatures.split(",")):
                exact = None
                if model_name == "markov":
                    exact = ExactMarkov(model, 5, L, T, eos)
                    exact.table = exact.marginals()
                for r in run(model, prompts, eos, L, T, args.budget, exact, names):
                    line = fmt(model_name, L, T, r)
                    lines.append(line)
                    print(line, flush=True)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
