#!/usr/bin/env python3
"""Write a golden-reference JSON for a Llama-family GGUF model, using Hugging Face transformers.

transformers reads the GGUF file, dequantizes every weight to float32 and builds its own
LlamaForCausalLM and tokenizer from the file's metadata. This script records, from that reference:

  * tokenizer cases (ids + decode round trip), including ids from a tokenizer whose pre-tokenizer is
    the one the model really uses (see `reference_tokenizer`), because transformers does not know the
    GGUF pre-tokenizer name "smollm";
  * the chat template rendered for one user message, and its ids;
  * for a few prompts: greedy continuations from `model.generate`, and top-k logits plus the
    logsumexp of the full logit row from a plain no-cache forward pass.

Usage:
  python3 scripts/golden/make_golden.py --gguf PATH/TO/model.gguf --out PATH/TO/golden.json

CPU only, float32, single-threaded, deterministic algorithms. See README.md beside this file.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys

# Pin threading before torch (and its OpenMP / MKL runtimes) start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)

import gguf  # noqa: E402
import numpy  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

try:
    from importlib.metadata import version as _pkg_version
except ImportError:  # pragma: no cover
    _pkg_version = None

TOP_K = 20
N_LOGIT_STEPS = 8  # generated positions recorded after the prompt's last position
MAX_NEW_TOKENS = 24
ROUND = 5

TOKENIZER_CASES = [
    "Hello, world! This is a plain English sentence.",
    " leading space",
    "trailing space ",
    "multiple   spaces   between  words",
    "   ",
    "line one\nline two\n\nline four\ttab\t\tdouble tab\r\nwindows",
    "12345 3.14159 2026",
    "x  42 and   7",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f980 emoji",
    'fn main() { println!("hi"); }',
    "<|im_start|>user\nHello<|im_end|>",
    "I'm sure it's what they'd've done, isn't it? DON'T",
    "",
]

CHAT_MESSAGES = [{"role": "user", "content": "What is a KV cache?"}]

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
]


def pkg_version(name):
    if _pkg_version is None:
        return None
    try:
        return _pkg_version(name)
    except Exception:
        return None


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reference_tokenizer(hf_tok):
    """The GGUF says `tokenizer.ggml.pre = "smollm"`. llama.cpp splits that as `\\p{N}` first and
    then the GPT-2 regex; the model's original tokenizer.json does the same with
    `Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]`. transformers' GGUF
    loader has no entry for "smollm" and keeps plain GPT-2 ByteLevel, which differs only in how
    whitespace before a digit is grouped. This returns a copy with the real pre-tokenizer."""
    backend = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return backend


def r(x):
    return round(float(x), ROUND)


def logit_record(row, position, next_token):
    """Top-k of one logit row (float32), plus logsumexp over the whole row (in float64)."""
    row64 = row.double()
    lse = torch.logsumexp(row64, dim=-1).item()
    # Stable order: by value desc, ties by id asc.
    values, ids = torch.sort(row, descending=True, stable=True)
    top = [[int(i), r(v)] for i, v in zip(ids[:TOP_K].tolist(), values[:TOP_K].tolist())]
    rec = {
        "position": position,
        "top": top,
        "logsumexp": r(lse),
        "top1_margin": r(values[0] - values[1]),
    }
    if next_token is not None:
        rec["next_token"] = int(next_token)
        rec["argmax_is_next_token"] = int(ids[0]) == int(next_token)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to the .gguf file")
    ap.add_argument("--out", required=True, help="where to write the JSON")
    ap.add_argument(
        "--attn",
        default="eager",
        help="attention implementation for the reference model (default: eager, the plain matmul one)",
    )
    args = ap.parse_args()

    gguf_path = os.path.abspath(args.gguf)
    gguf_dir, gguf_name = os.path.split(gguf_path)

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    ref_tok = reference_tokenizer(tok)
    # `torch_dtype=` is the older spelling of `dtype=`; transformers 5 warns on it.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation=args.attn
    )
    model.eval()
    cfg = model.config

    rope_theta = None
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rope_theta = rp.get("rope_theta")
    if rope_theta is None:
        rope_theta = getattr(cfg, "rope_theta", None)

    out = {
        "source": {
            "generator": "scripts/golden/make_golden.py",
            "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gguf_file": gguf_name,
            "gguf_sha256": sha256_of(gguf_path),
            "gguf_size_bytes": os.path.getsize(gguf_path),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "gguf": pkg_version("gguf"),
                "accelerate": pkg_version("accelerate"),
                "numpy": numpy.__version__,
            },
            "settings": {
                "device": "cpu",
                "dtype": "float32",
                "attn_implementation": model.config._attn_implementation,
                "torch_num_threads": torch.get_num_threads(),
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "logits_rounded_to_decimals": ROUND,
                "logsumexp": "over the full float32 logit row, computed in float64",
            },
        },
        "config": {
            "model_type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "rope_theta": rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "max_position_embeddings": cfg.max_position_embeddings,
            "lm_head_shares_embedding": model.lm_head.weight.data_ptr()
            == model.model.embed_tokens.weight.data_ptr(),
        },
    }

    # ---- tokenizer -------------------------------------------------------------------------
    cases = []
    for text in TOKENIZER_CASES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ref_ids = ref_tok.encode(text, add_special_tokens=False).ids
        decoded = tok.decode(ids)
        case = {
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode": decoded,
            "round_trip": decoded == text,
        }
        if ref_ids != ids:
            case["ids_smollm_pretokenizer"] = ref_ids
        cases.append(case)
    out["tokenizer"] = {
        "note": (
            "ids: transformers' tokenizer built from the GGUF, tokenizer(text, add_special_tokens=False). "
            "ids_smollm_pretokenizer appears only where the real SmolLM pre-tokenizer "
            "(llama.cpp 'smollm' = \\p{N} split then GPT-2 regex; HF Digits(individual)+ByteLevel) "
            "gives different ids; prefer it for matching llama.cpp."
        ),
        "class": type(tok).__name__,
        "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "len": len(tok),
        "adds_bos_by_default": tok("x")["input_ids"][:1] == [tok.bos_token_id],
        "cases": cases,
    }

    # ---- chat template ---------------------------------------------------------------------
    chat_text = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(chat_text, add_special_tokens=False)["input_ids"]
    templ = tok.apply_chat_template(CHAT_MESSAGES, tokenize=True, add_generation_prompt=True)
    if hasattr(templ, "keys") and "input_ids" in templ:
        templ = templ["input_ids"]
    if templ and isinstance(templ[0], list):
        templ = templ[0]
    out["chat"] = {
        "messages": CHAT_MESSAGES,
        "text": chat_text,
        "ids": chat_ids,
        "ids_match_tokenize_true": list(templ) == chat_ids,
    }

    # ---- prompts: greedy generation + logits -----------------------------------------------
    prompts = [{"name": p, "text": p, "ids": tok(p)["input_ids"]} for p in PLAIN_PROMPTS]
    prompts.append({"name": "chat: What is a KV cache?", "text": chat_text, "ids": chat_ids})

    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    for p in prompts:
        input_ids = torch.tensor([p["ids"]], dtype=torch.long)
        with torch.no_grad():
            gen = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
                pad_token_id=tok.pad_token_id,
            )
        new_ids = gen[0, input_ids.shape[1]:].tolist()
        full = p["ids"] + new_ids
        with torch.no_grad():
            logits = model(torch.tensor([full], dtype=torch.long), use_cache=False).logits[0].float()
        n_prompt = len(p["ids"])
        steps = []
        for j in range(N_LOGIT_STEPS + 1):
            pos = n_prompt - 1 + j
            if pos >= len(full):
                break
            nxt = new_ids[j] if j < len(new_ids) else None
            steps.append(logit_record(logits[pos], pos, nxt))
        p["generated_ids"] = new_ids
        p["generated_text"] = tok.decode(new_ids)
        p["stopped_on_eos"] = bool(new_ids) and new_ids[-1] in eos_ids
        p["logits"] = steps
        p["all_recorded_argmax_match_generate"] = all(s.get("argmax_is_next_token", True) for s in steps)
    out["generation"] = {
        "do_sample": False,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_ids": sorted(eos_ids),
        "logits_note": (
            "logits[k] is the row at absolute position `position` of prompt+generated ids (plain forward, "
            "use_cache=False); it predicts the token after that position. k=0 is the prompt's last position. "
            f"top holds the {TOP_K} largest [id, logit] pairs, ties broken by id."
        ),
    }
    out["prompts"] = prompts

    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dumps(out))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    for p in prompts:
        print(f"--- {p['name']!r}: {p['generated_text']!r}")


def dumps(obj, indent=0):
    """JSON with objects indented and every list of scalars (or of small lists) on one line."""
    pad = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) or (isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x)) for x in obj):
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        items = [f"{pad}  {dumps(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("non-finite float in output")
        return json.dumps(obj)
    return json.dumps(obj, ensure_ascii=False)


if __name__ == "__main__":
    main()
