"""Model trust and no silent swaps (mammo_core.store.registry): shipped models pinned in the repository,
trained-here models recorded by the trainer, hand-dropped folders unverified until an admin
confirms them, and storage errors said in one line."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from mammo_core.errors import ModelDirError
from mammo_core.store import registry
from mammo_core.store.card import read_card, write_card
from mammo_core.store.files import sha256_file, storage_error_message


def _drop_in(root, source, name, created="2999-01-01T00:00:00+00:00"):
    """A folder copied in by hand, with a future date and its own matching sha256."""
    shutil.copytree(source, root / name)
    card = read_card(root / name)
    card["name"], card["created"] = name, created
    write_card(root / name, card)
    return root / name


def test_shipped_models_are_pinned_in_the_repository():
    pinned = registry.pinned_models()
    assert registry.PINNED_MANIFEST.is_file()
    repo_weights = registry.PINNED_MANIFEST.parent
    shipped = [p for p in repo_weights.iterdir() if (p / registry.CARD_FILE).is_file() and not p.name.startswith(".")]
    assert shipped and {p.name for p in shipped} <= set(pinned)
    for path in shipped:
        assert sha256_file(path / registry.MODEL_FILE) == pinned[path.name]["model_sha256"]
        assert read_card(path)["model_sha256"] == pinned[path.name]["model_sha256"]
    entries = {e.name: e for e in registry.list_models(repo_weights)}
    assert all(entries[p.name].trust == registry.TRUST_SHIPPED for p in shipped)


def test_shipped_models_exist_and_verify():
    """Every shipped model folder is complete and matches its pinned sha256; needs no dataset (never skipped)."""
    shipped = [e.name for e in registry.list_models(registry.PINNED_MANIFEST.parent) if e.problem is None]
    assert shipped, "no shipped model under weights/"
    assert set(shipped) == set(registry.pinned_models())
    for name in shipped:
        card = registry.verify_model_dir(registry.PINNED_MANIFEST.parent / name)
        assert card["dataset"]["n_files"] == 7632


def test_trained_models_are_recorded_and_dropped_folders_are_unverified(tiny_weights_copy):
    root = tiny_weights_copy
    local = registry.local_models(root)
    assert local["tiny-grouped"]["source"] == registry.TRUST_TRAINED  # written by the trainer
    assert local["tiny-grouped"]["model_sha256"] == read_card(root / "tiny-grouped")["model_sha256"]
    _drop_in(root, root / "tiny-paper", "dropped")
    entries = {e.name: e for e in registry.list_models(root)}
    assert entries["dropped"].trust == registry.TRUST_UNVERIFIED and not entries["dropped"].trusted
    assert entries["tiny-grouped"].trusted and entries["tiny-paper"].trusted
    # The newest folder does not become active, and cannot be made active without a confirmation.
    assert registry.active_model_name(root) == "tiny-grouped"
    with pytest.raises(ModelDirError, match="unverified"):
        registry.set_active_model("dropped", root)
    assert registry.active_model_name(root) == "tiny-grouped"
    registry.set_active_model("dropped", root, confirmed_by="admin-alice")
    assert registry.active_model_name(root) == "dropped"
    confirmed = registry.local_models(root)["dropped"]
    assert confirmed["source"] == registry.TRUST_CONFIRMED and confirmed["by"] == "admin-alice"
    assert {e.name: e.trust for e in registry.list_models(root)}["dropped"] == registry.TRUST_CONFIRMED


def test_a_replaced_model_fails_against_its_recorded_hash(tiny_weights_copy):
    root = tiny_weights_copy
    # Replace tiny-grouped's files with tiny-paper's, card included: self-consistent, but not what was trained.
    for name in (registry.MODEL_FILE, registry.CARD_FILE):
        shutil.copy(root / "tiny-paper" / name, root / "tiny-grouped" / name)
    with pytest.raises(ModelDirError, match="recorded when it was trained"):
        registry.verify_model_dir(root / "tiny-grouped")


def test_active_model_failing_is_reported_never_replaced(tiny_weights_copy):
    root = tiny_weights_copy
    target = root / "tiny-grouped" / registry.MODEL_FILE
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    _drop_in(root, root / "tiny-paper", "newer")
    assert registry.active_model_name(root) == "tiny-grouped"
    with pytest.raises(ModelDirError, match="does not match"):
        registry.load_model(registry.resolve_model_dir(None, root=root))


def test_without_active_file_only_a_single_trusted_model_is_used(tiny_weights_copy):
    root = tiny_weights_copy
    (root / registry.ACTIVE_FILE).unlink()
    assert registry.active_model_name(root) is None  # two trusted models: the user must pick
    shutil.rmtree(root / "tiny-paper")
    _drop_in(root, root / "tiny-grouped", "dropped")
    assert registry.active_model_name(root) == "tiny-grouped"  # the unverified one is never chosen


def test_local_manifest_is_json_with_hashes(tiny_weights_copy):
    data = json.loads((tiny_weights_copy / registry.LOCAL_MANIFEST_FILE).read_text())
    assert data["schema"] == 1 and len(data["models"]["tiny-paper"]["model_sha256"]) == 64


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "read-only")])
def test_storage_errors_are_one_line(code, words):
    message = storage_error_message(OSError(code, "x", "/w/.tmp-m/model.keras"), "the model")
    assert words in message and "\n" not in message and message.startswith("/w/.tmp-m/model.keras")


def test_disk_full_while_training_is_one_line_exit_1_and_leaves_nothing(tiny_dataset, tmp_path, monkeypatch, capsys):
    from mammo_core import cli
    from mammo_core.training import train as train_mod

    root = tmp_path / "w"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / ".tmp-full" / "model.keras"))

    monkeypatch.setattr(train_mod, "record_model", disk_full)
    code = cli.main(["--weights", str(root), "train", "--data", str(tiny_dataset), "--name", "full", "--epochs", "1",
                     "--batch-size", "8", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: ") and "disk is full" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (root / "full").exists() and not list(root.glob(".tmp-*"))
    assert "full" not in registry.local_models(root)


def test_a_failed_runs_storage_error_reads_plainly():
    from mammo_core.store import jobs

    text = jobs._readable_error("[Errno 28] No space left on device: '/w/.tmp-x/model.keras'")
    assert text.startswith("/w/.tmp-x/model.keras: the disk is full")
    assert jobs._readable_error("some other failure") == "some other failure"


def test_cli_predict_with_a_broken_active_model_says_so_and_asks_to_pick(tiny_weights_copy, tmp_path, sample_png, capsys):
    from mammo_core import cli

    target = tiny_weights_copy / "tiny-grouped" / registry.MODEL_FILE
    target.write_bytes(target.read_bytes() + b"tampered")
    image = tmp_path / "scan.png"
    image.write_bytes(sample_png)
    code = cli.main(["--weights", str(tiny_weights_copy), "predict", str(image), "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""  # nothing scored with another model
    last = err.strip().splitlines()[-1]  # TensorFlow may print its start-up chatter first
    assert last.startswith("error: ") and "tiny-grouped" in last and "does not match" in last and "--model NAME" in last
