"""Validation bits per byte: comparable across tokenizers and with the training logs.

    python evals/bpb.py --ckpt out/runs/d12                    # flags as evals/run_all.py
    python evals/bpb.py --ckpt out/runs/d12 --bpb_corpus tinyshakespeare --bpb_tokens 262144

bpb = nats summed over the val tokens / (ln 2 x the UTF-8 bytes those tokens decode to), computed by
nanochat.loss_eval.evaluate_bpb on nanochat.dataloader.val_batches: the first --bpb_tokens tokens
of the corpus's val split (all of it if shorter), the same windows on every call.
"""

import math

from nanochat.dataloader import val_batches
from nanochat.dataset import prepare_corpus
from nanochat.loss_eval import evaluate_bpb

from evals.common import TaskResult, autocast_context, finish_speed, measure, rank_and_world

TASK = "bpb"
DEFAULT_CORPUS = "enwiki"


def corpus_of_checkpoint(meta: dict) -> str:
    """The corpus the model was trained on (meta['args']['data'] of base_train), else enwiki."""
    args = meta.get("args") or {}
    return args.get("data") or DEFAULT_CORPUS


def evaluate(model, tokenizer, device, corpus: str = DEFAULT_CORPUS, num_tokens: int = 2 ** 20,
             batch_size: int = 8, data_dir=None, mhc_gates=None):
    """TaskResult 'bpb' (value: bits per byte; no stderr: it is one number over fixed tokens)."""
    rank, world_size = rank_and_world()
    shards = prepare_corpus(corpus, tokenizer, split="val", data_dir=data_dir)
    batches = val_batches(shards, batch_size, model.config.sequence_len, num_tokens, rank, world_size, device)
    with measure(device) as speed, autocast_context(device):
        out = evaluate_bpb(model, batches, tokenizer.token_bytes(), mhc_gates=mhc_gates)
    return TaskResult(
        name=TASK,
        metrics={"bpb": {"value": out["bpb"], "stderr": None},
                 "nats_per_token": {"value": out["nats"] / max(out["tokens"], 1), "stderr": None}},
        n=out["tokens"], records=[{"corpus": corpus, "split": "val", **out, "bits": out["nats"] / math.log(2)}],
        speed=finish_speed(speed, out["tokens"], "val tokens"),
        extra={"corpus": corpus, "split": "val", "bytes": out["bytes"], "seq_len": model.config.sequence_len})


if __name__ == "__main__":
    from evals.run_all import main
    from nanochat.common import exit_on_bad_input

    exit_on_bad_input(main, tasks=[TASK])
