"""Training text: local files or folders, a Hugging Face dataset, or `self` (sampled from the dense model).

Whatever the source, text is tokenised, documents are joined with the end-of-sequence token and
packed into fixed-length sequences (no padding), and the last sequences are held out for validation
and threshold calibration.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import DataError
from ..io import expand_user, file_sha256, save_safetensors_atomic
from ..models.adapters import unwrap
from ..models.loading import hub_problem

# .tokens/.raw are the WikiText release files: plain text under another name
TEXT_SUFFIXES = (".txt", ".tokens", ".raw")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
SEED_PROMPTS = ("", "The", "In", "Once upon a time", "Question:", "Today", "A", "It was", "Here is", "When")


@dataclass
class PackedData:
    train: torch.Tensor  # (N, seq_len) int64
    val: torch.Tensor  # (M, seq_len) int64
    source: str
    digest: str | None = None  # data_digest of the source: a resumed run checks its data is the same

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def _read_txt(path: Path) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8-sig")]  # a byte-order mark is no text
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def _read_jsonl(path: Path, field: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (a .jsonl file holds one JSON object per line)") from None
    texts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or field not in row:
            raise DataError(f"{path}:{lineno}: no {field!r} field (choose the field with --text-field)")
        if not isinstance(row[field], str):
            raise DataError(f"{path}:{lineno}: field {field!r} is not a string")
        texts.append(row[field])
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow as pa  # a second to import: only parquet data pays for it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {table.column_names}; choose with --text-field)")
    kind = table.schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text (choose the text column with --text-field)")
    return [t for t in table.column(field).to_pylist() if t is not None]


def data_files(source: str) -> list[Path] | None:
    """The local files behind `source` (None: a Hugging Face dataset name); fails fast on a bad path."""
    if not source.strip():
        # Path("") is the working directory: an unset shell variable would train on whatever lies there
        raise DataError("the data source is empty: give a file, a folder, a dataset name or 'self'")
    path = expand_user(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _suffix(p) in SUFFIXES and _seen(p, path) and p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(SUFFIXES)} files (hidden ones are not read)")
        return files
    if path.is_file():
        if _suffix(path) not in SUFFIXES:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
        return [path]
    if source.startswith((".", "/", "~")) or Path(source).suffix in SUFFIXES or source.count("/") > 1:
        raise DataError(f"data path {source} does not exist")
    return None


def _suffix(path: Path) -> str:
    return path.suffix.lower()  # NOTES.TXT is text too


def _seen(path: Path, root: Path) -> bool:
    """Whether a folder's file is data a user chose: not hidden and not inside a hidden folder, where editors,
    notebooks and archivers keep copies (.ipynb_checkpoints/corpus-checkpoint.txt, __MACOSX/._corpus.txt). Such a
    copy of the file that sorts last would train on the text held out for validation and calibration."""
    return not any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def data_digest(source: str) -> str | None:
    """sha256 of the training data's content: every file's bytes, with its name inside a folder (the
    reading order). None for 'self' (the model and seed make it) and hub datasets (no local files)."""
    files = None if source == "self" else data_files(source)
    if files is None:
        return None
    root = expand_user(source)
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root).as_posix() if root.is_dir() else ""  # a single file: its content only
        h.update(f"{name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Documents from a .txt/.jsonl/.parquet file (WikiText .tokens/.raw count as .txt), a folder of them,
    or a Hugging Face dataset name."""
    files = data_files(source)
    if files is None:
        return _read_hub(source, text_field)
    texts: list[str] = []
    read: dict[str, Path] = {}  # each file's text digest: the file that gave it
    for f in files:
        if _suffix(f) in TEXT_SUFFIXES:
            mine = _read_txt(f)
        elif _suffix(f) == ".jsonl":
            mine = _read_jsonl(f, text_field)
        else:
            mine = _read_parquet(f, text_field)
        # A copy of a file in the folder would train on the held-out text (the end of the last file) or count
        # twice: refuse it rather than guess which one the user meant.
        digest = hashlib.sha256("\0".join(mine).encode("utf-8", "surrogatepass")).hexdigest()
        if any(t.strip() for t in mine) and digest in read:
            raise DataError(f"{f} holds the same text as {read[digest]}; remove one of them")
        read[digest] = f
        texts += mine
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{source}: no text found (empty file or empty {text_field!r} fields)")
    return texts


def _read_hub(name: str, text_field: str) -> list[str]:
    import datasets

    problem = hub_problem(name, "dataset")
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or bool(problem)  # the hub cannot help: the cache may, at once
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated: all are one-line data errors
        first = problem or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise DataError(f"{name!r} is neither a local path nor a loadable Hugging Face dataset ({first})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name}: no column {text_field!r} (columns: {ds.column_names})")
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def tokenize_and_pack(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into (N, seq_len) rows; the remainder is dropped."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split(sequences: torch.Tensor, val_sequences: int, source: str, max_tokens: int | None = None) -> PackedData:
    """The last `val_sequences` rows held out, the rest to train on; `max_tokens`: the cap the rows were read
    under, named when they are too few."""
    seq_len = sequences.shape[1] if sequences.dim() == 2 else 0
    if sequences.shape[0] < val_sequences + 1:
        more = "more text" if max_tokens is None else f"a larger --max-tokens (now {max_tokens})"
        raise DataError(
            f"{source}: only {sequences.shape[0]} sequences of {seq_len} tokens; need at least "
            f"{val_sequences + 1} ({val_sequences} held out for validation + 1 to train). Give {more}, "
            f"a shorter --seq-len or (train) fewer --val-sequences"
        )
    return PackedData(sequences[:-val_sequences], sequences[-val_sequences:], source)


@torch.no_grad()
def sample_self(routed, tokenizer, count: int, seq_len: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """`count` sequences of exactly `seq_len` tokens sampled from the dense model (routing forced off)."""
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    try:
        with routed.forced("execute"):
            for start in range(0, count, batch_size):
                n = min(batch_size, count - start)
                # One seed prompt per batch keeps prompts unpadded; BOS first so the model starts a document.
                prompt = SEED_PROMPTS[(start // batch_size) % len(SEED_PROMPTS)]
                # at most seq_len - 1 prompt tokens, so that even a short sequence samples at least one
                ids = ([bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"])[:seq_len]
                input_ids = torch.tensor([ids] * n, device=next(routed.model.parameters()).device)
                new = seq_len - input_ids.shape[1] + 1
                out = routed.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=1.0,
                    top_k=50,
                    top_p=0.95,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=tokenizer.pad_token_id,
                )
                rows.append(out[:, 1 : seq_len + 1].cpu())  # drop BOS: every row is a plain token stream
    finally:
        torch.set_rng_state(gen_state)
    return torch.cat(rows)


def self_cache_path(cache_dir: Path, fingerprint: str, count: int, seq_len: int, seed: int, dtype: str) -> Path:
    """The fingerprint rounds weights to bf16, so the dtype the model samples in is part of the key."""
    key = hashlib.sha256(f"{fingerprint}:{count}:{seq_len}:{seed}:{dtype}".encode()).hexdigest()[:12]
    return cache_dir / f"self-{count}x{seq_len}-{key}.safetensors"


def load_self(routed, tokenizer, count: int, seq_len: int, seed: int, cache_dir: Path) -> torch.Tensor:
    """Self-sampled sequences, generated once and reused from `cache_dir` on later runs."""
    dtype = str(next(routed.model.parameters()).dtype).removeprefix("torch.")
    path = self_cache_path(cache_dir, routed.config.base.fingerprint, count, seq_len, seed, dtype)
    if path.exists():
        try:
            ids = load_file(path)["input_ids"]
            vocab = unwrap(routed.model).get_input_embeddings().num_embeddings
            # what this run would sample: token ids of this shape (not indices past the embedding, not floats)
            if ids.dtype == torch.long and ids.shape == (count, seq_len) and 0 <= ids.min() <= ids.max() < vocab:
                return ids
        except (SafetensorError, OSError, KeyError, RuntimeError):
            pass
        path.unlink()  # a cache, not user data: regenerate
    ids = sample_self(routed, tokenizer, count, seq_len, seed)
    save_safetensors_atomic(path, {"input_ids": ids}, metadata={"format": "skipgpt-self-data"})
    return ids


def load_data(cfg, routed, tokenizer, cache_dir: Path) -> PackedData:
    """The packed train/validation split that `cfg` asks for."""
    if cfg.data == "self":
        ids = load_self(routed, tokenizer, cfg.self_sequences + cfg.val_sequences, cfg.seq_len, cfg.seed, cache_dir)
        # The samples come in batches of one seed prompt each, so the last rows would all share one prompt that
        # no training row starts from: shuffle (seeded, after the cache) so held-out rows mix the prompts.
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed))
        return split(ids[order], cfg.val_sequences, "self")
    digest = data_digest(cfg.data)
    texts = read_texts(cfg.data, cfg.text_field)
    sequences = tokenize_and_pack(texts, tokenizer, cfg.seq_len, cfg.max_tokens)
    # the cap is named when it is what ended the text (within the part-row that packing dropped)
    cap = cfg.max_tokens
    capped = cap if cap is not None and sequences.numel() + cfg.seq_len > cap else None
    packed = split(sequences, cfg.val_sequences, cfg.data, capped)
    packed.digest = digest
    return packed


@functools.lru_cache(maxsize=4)
def batch_order(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """A seeded permutation per epoch, independent of the global RNG so resuming needs only the step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_sequences, generator=g)


def micro_batches(
    data: torch.Tensor, step: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0, world: int = 1
) -> Iterator[torch.Tensor]:
    """The micro-batches of optimizer step `step` for process `rank`: a pure function of its arguments."""
    n = data.shape[0]
    per_step = batch_size * grad_accum * world
    for micro in range(grad_accum):
        rows = []
        for j in range(batch_size):
            index = step * per_step + (micro * world + rank) * batch_size + j
            epoch, pos = divmod(index, n)
            rows.append(int(batch_order(n, seed, epoch)[pos]))
        yield data[rows]
