"""configs.catalog: the packaged catalog, user catalogs, served models, sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from configs.capabilities import REGISTRY
from configs.catalog import CatalogError, load_catalog
from tasks.contracts.embeddings import EmbeddingsOptions

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def write(path: Path, models: Any) -> Path:
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def entry(model_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "capability": "embeddings",
        "backend": "workers.backends.fake:FakeEmbeddingBackend",
        "source": {"path": "/"},
        **kw,
    }


def test_packaged_catalog_has_the_production_entries() -> None:
    catalog = load_catalog()
    for model_id in (
        MINILM,
        "BAAI/bge-m3",
        "google/embeddinggemma-300m",
        "intfloat/multilingual-e5-large",
        "laneway/fake-embeddings",
    ):
        assert catalog.get(model_id).capability == "embeddings"
    minilm = catalog.get(MINILM)
    assert minilm.max_input_tokens == 256
    assert EmbeddingsOptions.of(minilm).dimensions == 384
    assert not EmbeddingsOptions.of(minilm).matryoshka_dims
    assert EmbeddingsOptions.of(catalog.get("google/embeddinggemma-300m")).matryoshka_dims


def test_packaged_minilm_resolves_to_the_installed_weights() -> None:
    path = Path(load_catalog().get(MINILM).resolve_path(auto_download=False))
    assert (path / "model.safetensors").is_file()
    assert (path / "modules.json").is_file()


def test_user_catalog_adds_and_replaces_entries(tmp_path: Path) -> None:
    user = write(
        tmp_path / "mine.yaml",
        [
            entry("me/new", defaults={"max_input_tokens": 64, "matryoshka_dims": [32, 16]}),
            entry(MINILM, defaults={"max_input_tokens": 128}),
        ],
    )
    catalog = load_catalog(user)
    assert catalog.get("me/new").max_input_tokens == 64
    assert EmbeddingsOptions.of(catalog.get("me/new")).matryoshka_dims == (32, 16)
    assert catalog.get(MINILM).max_input_tokens == 128  # replaced by id
    assert catalog.get("BAAI/bge-m3").capability == "embeddings"  # packaged ones stay


def test_extra_keys_reach_the_backend(tmp_path: Path) -> None:
    user = write(tmp_path / "c.yaml", [entry("me/slow", forward_delay_s=0.5)])
    assert load_catalog(user).get("me/slow").extra == {"forward_delay_s": 0.5}


def test_relative_path_source_is_relative_to_the_catalog_file(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    user = write(tmp_path / "c.yaml", [entry("me/local", source={"path": "weights"})])
    got = load_catalog(user).get("me/local")
    assert got.resolve_path(auto_download=False) == str((tmp_path / "weights").resolve())


def test_string_source_forms(tmp_path: Path) -> None:
    user = write(
        tmp_path / "c.yaml",
        [entry("me/dir", source=str(tmp_path)), entry("me/hub", source="org/name")],
    )
    catalog = load_catalog(user)
    assert catalog.get("me/dir").source == {"path": str(tmp_path)}
    assert catalog.get("me/hub").source == {"hub": "org/name"}


def test_served_unknown_id_fails_naming_catalog_ids() -> None:
    catalog = load_catalog()
    with pytest.raises(CatalogError) as info:
        catalog.served([MINILM, "nope/missing"])
    message = str(info.value)
    assert "nope/missing" in message
    assert MINILM in message
    assert "BAAI/bge-m3" in message


def test_get_unknown_id_names_catalog_ids() -> None:
    with pytest.raises(CatalogError, match=r"catalog ids:.*laneway/fake-embeddings"):
        load_catalog().get("nope/missing")


def test_served_returns_entries_in_order() -> None:
    got = load_catalog().served(["laneway/fake-embeddings", MINILM])
    assert [e.id for e in got] == ["laneway/fake-embeddings", MINILM]


def test_hub_source_needs_auto_download() -> None:
    bge = load_catalog().get("BAAI/bge-m3")
    with pytest.raises(CatalogError, match="LANEWAY_AUTO_DOWNLOAD"):
        bge.resolve_path(auto_download=False)
    assert bge.resolve_path(auto_download=True) == "BAAI/bge-m3"


def test_missing_local_directory(tmp_path: Path) -> None:
    user = write(tmp_path / "c.yaml", [entry("me/gone", source={"path": str(tmp_path / "x")})])
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(user).get("me/gone").resolve_path(auto_download=False)


def test_package_not_installed(tmp_path: Path) -> None:
    user = write(tmp_path / "c.yaml", [entry("me/pkg", source={"package": "no_such_pkg_xyz"})])
    with pytest.raises(CatalogError, match="not installed"):
        load_catalog(user).get("me/pkg").resolve_path(auto_download=False)


def test_unknown_capability_is_refused(tmp_path: Path) -> None:
    user = write(tmp_path / "c.yaml", [entry("me/x", capability="telepathy")])
    with pytest.raises(CatalogError, match="telepathy"):
        load_catalog(user)


def test_entry_missing_a_key_is_refused(tmp_path: Path) -> None:
    bad = entry("me/x")
    del bad["source"]
    with pytest.raises(CatalogError, match="source"):
        load_catalog(write(tmp_path / "c.yaml", [bad]))


def test_an_entry_without_a_backend_gets_its_capabilitys_default(tmp_path: Path) -> None:
    plain = entry("me/x")
    del plain["backend"]
    got = load_catalog(write(tmp_path / "c.yaml", [plain])).get("me/x")
    assert got.backend == REGISTRY["embeddings"].default_backend


@pytest.mark.parametrize("text", ["models: 3\n", "just a string\n", "[1, 2]\n"])
def test_malformed_catalog_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match="models"):
        load_catalog(path)


def test_unreadable_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "absent.yaml")
