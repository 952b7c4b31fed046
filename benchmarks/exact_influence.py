"""Exact influence on a model small enough to build the damped Gauss-Newton matrix of every tracked
parameter explicitly (by Jacobians), and how well each strategy's scores agree with it.

    .venv/bin/python benchmarks/exact_influence.py [--readme]

The model is a 2-layer, 16-wide GPT-2 trained on sentences of a small template language; the
tracked parameters are its MLP weights and biases (4,256 numbers), as infl tracks them by default.
Exact: G = mean over training sequences of sum_t J_t^T (diag p_t - p_t p_t^T) J_t (J_t the Jacobian
of token t's logits), damped per module by 0.1 x its mean eigenvalue, and
I(z) = grad L_q^T (G + damping)^-1 grad L(z). infl's scores come from its own CLI stages.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import readme_block
import torch
from torch.func import functional_call, grad, jacrev

from infl import artifacts, modeling
from infl.config import FitConfig, QueryConfig, ScoreConfig
from infl.gradients import sequence_loss
from infl.stages import build_query, fit_factors, score

NOUNS = "cat dog bird fish horse mouse lion bear wolf fox owl frog".split()
VERBS = "sees chases likes follows helps finds".split()
ADJS = "big small red old young quick".split()


def language(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}" for _ in range(n)]


def build(out: Path, sentences: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )
    ids = torch.tensor([tokenizer(s)["input_ids"] for s in sentences])  # all the same length
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(400):
        batch = ids[torch.randint(0, len(ids), (32,))]
        loss = sequence_loss(model(input_ids=batch).logits, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def exact_scores(
    model_dir: Path, train: list[str], queries: list[dict], block_diagonal: bool = False
) -> tuple[np.ndarray, list[str]]:
    tokenizer = modeling.load_tokenizer(model_dir)
    model = modeling.load_model(model_dir).double()
    model.requires_grad_(False)
    model.config._attn_implementation = "eager"  # torch.func has no batching rule for CPU flash attention
    specs = modeling.tracked_modules(model, "mlp")
    names = [n for s in specs for n in (f"{s.name}.weight", f"{s.name}.bias")]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].flatten() for n in names])

    def unflat(flat):
        return dict(zip(names, (c.view_as(params[n]) for n, c in zip(names, flat.split(sizes)))))

    def logits(flat, ids):
        return functional_call(model, unflat(flat), (ids[None],)).logits[0].double()

    def loss(flat, ids, labels):
        return sequence_loss(logits(flat, ids)[None], labels[None]).sum()

    P = flat0.numel()
    G = torch.zeros(P, P, dtype=torch.float64)
    train_ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in train]
    for ids in train_ids:
        J = jacrev(logits)(flat0, ids)[:-1]  # [T-1, V, P]: tokens that predict a next token
        p = torch.softmax(logits(flat0, ids)[:-1], -1)  # [T-1, V]
        Jp = torch.einsum("tv,tvp->tp", p, J)
        G += torch.einsum("tv,tvp,tvq->pq", p, J, J) - torch.einsum("tp,tq->pq", Jp, Jp)
    G /= len(train_ids)
    damping = torch.zeros(P, dtype=torch.float64)  # per module: 0.1 x mean eigenvalue (= trace / size)
    offsets = np.cumsum([0] + sizes)
    for spec in specs:  # a module's weight and bias share its damping
        i = names.index(f"{spec.name}.weight")
        lo, hi = offsets[i], offsets[i + 2]
        damping[lo:hi] = 0.1 * torch.diagonal(G)[lo:hi].mean()
    train_grads = torch.stack([grad(loss)(flat0, ids, ids) for ids in train_ids])  # [N, P]
    query_grads = []
    for q in queries:
        n_prompt = len(tokenizer(q["prompt"])["input_ids"])
        ids = torch.tensor(tokenizer(q["prompt"] + q["completion"])["input_ids"])
        labels = ids.clone()
        labels[:n_prompt] = -100
        query_grads.append(grad(loss)(flat0, ids, labels))
    if block_diagonal:  # keep only each module's own block, as every K-FAC-style method does
        keep = torch.zeros_like(G, dtype=torch.bool)
        for spec in specs:
            i = names.index(f"{spec.name}.weight")
            keep[offsets[i] : offsets[i + 2], offsets[i] : offsets[i + 2]] = True
        G = G * keep
    solved = torch.linalg.solve(G + torch.diag(damping), torch.stack(query_grads).T)  # [P, Q]
    return (solved.T @ train_grads.T).detach().numpy(), [s.name for s in specs]


def spearman(x, y) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/exact"))
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--samples", type=int, default=1, help="sampled labels per training sentence for the fit")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    train = language(150)
    queries = [
        {"id": f"q{i}", "prompt": " ".join(s.split()[:4]), "completion": " " + " ".join(s.split()[4:])}
        for i, s in enumerate(train[:4] + language(4, seed=1))
    ]
    corpus = args.out / "train.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(train)))
    fit_corpus = args.out / "fit.jsonl"  # each sentence `samples` times under new ids: new label draws
    fit_corpus.write_text(
        "".join(
            json.dumps({"id": f"s{i}-{k}", "text": t}) + "\n" for k in range(args.samples) for i, t in enumerate(train)
        )
    )
    qfile = args.out / "queries.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in queries))
    model_dir = build(args.out / "model", train)
    exact, _ = exact_scores(model_dir, train, queries)
    blocks, _ = exact_scores(model_dir, train, queries, block_diagonal=True)

    lines = [
        "| strategy | Pearson with exact | Spearman with exact | top-1 agrees | Pearson with exact block-diagonal |",
        "|---|---:|---:|---:|---:|",
    ]
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        d = args.out / strategy
        fit_factors.run(FitConfig(model=model_dir, corpus=(fit_corpus,), out=d / "f.zarr", strategy=strategy))
        build_query.run(QueryConfig(factors=d / "f.zarr", queries=qfile, out=d / "q.zarr", rank=None))
        score.run(ScoreConfig(queries=d / "q.zarr", corpus=(corpus,), out=d / "s.zarr"))
        ours = np.asarray(artifacts.open_complete(d / "s.zarr", "scores")["total"][...], dtype=np.float64)
        pearson = np.mean([np.corrcoef(ours[q], exact[q])[0, 1] for q in range(len(queries))])
        rho = np.mean([spearman(ours[q], exact[q]) for q in range(len(queries))])
        top1 = np.mean([np.argmax(ours[q]) == np.argmax(exact[q]) for q in range(len(queries))])
        block_r = np.mean([np.corrcoef(ours[q], blocks[q])[0, 1] for q in range(len(queries))])
        lines.append(f"| {strategy} | {pearson:.3f} | {rho:.3f} | {top1:.2f} | {block_r:.3f} |")
    agree = np.mean([np.corrcoef(blocks[q], exact[q])[0, 1] for q in range(len(queries))])
    lines.append(f"| exact block-diagonal | {agree:.3f} | | | 1 |")
    header = (
        f"{len(train)} training sentences, {len(queries)} queries, 4,256 tracked parameters "
        f"(MLP weights and biases of a 2-layer, 16-wide GPT-2); mean over queries."
    )
    readme_block.publish("exact", [header, "", *lines], args.readme)


if __name__ == "__main__":
    main()
