"""The model registry: shipped + user bundles, numeric version order, default, broken bundles, register."""
from __future__ import annotations

import json
import zipfile

import pytest
from helpers import import_slicer_core  # noqa: E402

import_slicer_core()

from helpers import tiny_bundle, tiny_refinement_bundle  # noqa: E402
from IDEALSegmentLib.registry import (  # noqa: E402
    DEFAULT_MODEL_ID,
    SHIPPED_MODELS_DIR,
    ModelRegistry,
    default_user_dir,
    next_patch_version,
    version_key,
)

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.model.bundle import load_bundle, save_bundle  # noqa: E402
from IDEALTrain.model.card import REFINEMENT_FOLDER  # noqa: E402


def write_bundle(folder, model_id, version, **card):
    bundle = tiny_bundle()
    bundle.model_id, bundle.version = model_id, version
    for key, value in card.items():
        setattr(bundle, key, value)
    return save_bundle(bundle, folder / f"{model_id}-{version}")


@pytest.fixture
def folders(tmp_path):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    return shipped, user


def test_versions_compare_numerically():
    versions = ["1.9.0", "1.10.0", "1.10.0-rc1", "0.2", "1.9.1", "10.0.0"]
    assert sorted(versions, key=version_key) == ["0.2", "1.9.0", "1.9.1", "1.10.0-rc1", "1.10.0", "10.0.0"]
    assert next_patch_version("1.2.9") == "1.2.10" and next_patch_version("2.0") == "2.0.1"


def test_entries_find_and_default_prefer_the_shipped_default(folders):
    shipped, user = folders
    write_bundle(shipped, DEFAULT_MODEL_ID, "1.9.0")
    write_bundle(shipped, DEFAULT_MODEL_ID, "1.10.0", validation={"dice": 0.875}, training={"labeled_data": "ssl4mis:acdc", "recipe": {"iterations": 30000}})
    write_bundle(user, "my-model", "0.3.0", created="2099-01-01T00:00:00+00:00")
    registry = ModelRegistry(user, shipped)
    entries = registry.entries()
    assert [(e.model_id, e.version, e.source) for e in entries] == [
        (DEFAULT_MODEL_ID, "1.10.0", "shipped"), (DEFAULT_MODEL_ID, "1.9.0", "shipped"), ("my-model", "0.3.0", "user"),
    ]
    assert registry.problems == []
    latest = registry.find(DEFAULT_MODEL_ID)
    assert latest.version == "1.10.0" and latest.validation_dice == 0.875
    assert "ssl4mis:acdc" in latest.training_summary and "30000 iterations" in latest.training_summary
    assert registry.find(DEFAULT_MODEL_ID, "1.9.0").path == shipped / f"{DEFAULT_MODEL_ID}-1.9.0"
    assert registry.default() == latest  # shipped default wins over the newer user model
    assert entries[2].display_name == "my-model 0.3.0 (yours)"
    with pytest.raises(IdealError, match="has no version 2.0.0.*1.10.0, 1.9.0"):
        registry.find(DEFAULT_MODEL_ID, "2.0.0")
    with pytest.raises(IdealError, match="no model 'absent'.*my-model"):
        registry.find("absent")


def test_default_without_the_shipped_model_is_the_newest_and_none_is_a_clear_error(folders):
    shipped, user = folders
    registry = ModelRegistry(user, shipped)
    with pytest.raises(IdealError, match="no segmentation model is installed.*register"):
        registry.default()
    write_bundle(user, "old", "5.0.0", created="2024-01-01T00:00:00+00:00")
    write_bundle(user, "new", "0.1.0", created="2025-06-01T00:00:00+00:00")
    assert registry.default().model_id == "new"


def test_broken_bundles_are_reported_not_raised(folders):
    shipped, user = folders
    good = write_bundle(shipped, "good", "1.0.0")
    (shipped / "junk-card").mkdir()
    (shipped / "junk-card" / "card.json").write_text("{not json")
    (shipped / "junk-card" / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    truncated = write_bundle(shipped, "truncated", "1.0.0")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    encoder = tiny_bundle()
    encoder.kind, encoder.model_id = "pretrained-encoder", "encoder"
    encoder.weights = {k: v for k, v in encoder.weights.items() if k.startswith("encoder.")}
    save_bundle(encoder, user / "encoder")
    (shipped / ".partial-x").mkdir()  # an interrupted copy is not a bundle and not a problem
    registry = ModelRegistry(user, shipped)
    assert [e.path for e in registry.entries()] == [good]
    problems = "\n".join(registry.problems)
    assert len(registry.problems) == 3, problems
    assert "junk-card" in problems and "not valid JSON" in problems
    assert "truncated" in problems and "checksum" in problems
    assert "pretrained-encoder bundle, not a segmentation model" in problems


def test_register_copies_a_new_version_and_never_replaces(folders, tmp_path):
    shipped, user = folders
    trained = write_bundle(tmp_path, "my-model", "0.1.0")
    original_card = (trained / "card.json").read_text()
    registry = ModelRegistry(user, shipped)
    first = registry.register(trained)
    second = registry.register(trained)  # the same version again: next free patch version
    assert (first.version, second.version) == ("0.1.0", "0.1.1")
    assert second.path == user / "my-model-0.1.1" and second.source == "user"
    card = json.loads((second.path / "card.json").read_text())
    assert card["version"] == "0.1.1" and card["registered_from"] == {"path": str(trained.resolve()), "version": "0.1.0"}
    assert load_bundle(second.path).version == "0.1.1"  # still verifies (checksum covers the weights)
    assert (trained / "card.json").read_text() == original_card
    with pytest.raises(IdealError, match="version 0.1.0 is already installed"):
        registry.register(trained, version="0.1.0")
    third = registry.register(trained, version="2.0.0")
    assert registry.find("my-model").path == third.path
    assert sorted(p.name for p in user.iterdir()) == ["my-model-0.1.0", "my-model-0.1.1", "my-model-2.0.0"]  # no leftovers
    with pytest.raises(IdealError, match="no such model bundle"):
        registry.register(tmp_path / "absent")


def test_register_brings_the_models_refinement_network_along(folders, tmp_path):
    shipped, user = folders
    trained = write_bundle(tmp_path, "my-model", "0.1.0")
    save_bundle(tiny_refinement_bundle(load_bundle(trained)), trained / REFINEMENT_FOLDER)
    entry = ModelRegistry(user, shipped).register(trained)
    copied = load_bundle(entry.path / REFINEMENT_FOLDER)  # verifies its checksum
    assert copied.kind == "refinement" and copied.weights.keys() == load_bundle(trained / REFINEMENT_FOLDER).weights.keys()
    assert [e.model_id for e in ModelRegistry(user, shipped).entries()] == ["my-model"]  # not listed as a model


def test_default_locations():
    assert SHIPPED_MODELS_DIR.parts[-3:] == ("IDEALSegment", "Resources", "Models")
    assert ModelRegistry(shipped_dir=SHIPPED_MODELS_DIR).find(DEFAULT_MODEL_ID).source == "shipped"  # the model ships there
    assert default_user_dir().parts[-2:] == ("IDEALSegment", "Models")


def rewrite_card(bundle_folder, **changes):
    """Change card fields in place, keeping the weights and their (still valid) checksum."""
    card_file = bundle_folder / "card.json"
    card = json.loads(card_file.read_text())
    card.update(changes)
    card_file.write_text(json.dumps(card))


def test_an_unorderable_version_is_one_broken_bundle_not_a_crash(folders):
    shipped, user = folders
    good = write_bundle(shipped, "good", "1.0.0")
    odd = write_bundle(user, "odd", "1.0.0")
    rewrite_card(odd, version="1.\u00b2")  # a superscript two: isdigit() but not int()-able
    registry = ModelRegistry(user, shipped)
    assert [e.path for e in registry.entries()] == [good]
    assert len(registry.problems) == 1 and str(odd) in registry.problems[0]
    assert version_key("1.\u00b2") < version_key("1.0")  # ordered as text, never int("\u00b2")


def test_every_problem_names_its_bundle(folders):
    shipped, user = folders
    labels = write_bundle(shipped, "labels", "1.0.0")
    rewrite_card(labels, architecture={**json.loads((labels / "card.json").read_text())["architecture"], "num_classes": 6})
    unsigned = write_bundle(shipped, "unsigned", "1.0.0")
    card = json.loads((unsigned / "card.json").read_text())
    rewrite_card(unsigned, weights={**card["weights"], "sha256": ""})
    (shipped / "empty-folder").mkdir()
    registry = ModelRegistry(user, shipped)
    assert registry.entries() == []
    assert len(registry.problems) == 3
    for problem, folder in zip(sorted(registry.problems), sorted([labels, unsigned, shipped / "empty-folder"])):
        assert problem.startswith(f"{folder}: "), problem
    assert any("records no valid weights checksum" in p for p in registry.problems)


def test_registry_and_bundle_loader_refuse_broken_bundles_with_one_message(tmp_path):
    """One torch-free implementation of the bundle checks: the registry and load_bundle say the same thing."""
    from IDEALSegmentLib.registry import read_bundle

    broken = {}
    for name, change in (
        ("bad-json", lambda b: (b / "card.json").write_text("{not json")),
        ("newer-format", lambda b: rewrite_card(b, format_version=99)),
        ("no-sha", lambda b: rewrite_card(b, weights={"file": "model.safetensors", "sha256": "abc"})),
        ("truncated", lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:100])),
        ("no-card", lambda b: (b / "card.json").unlink()),
    ):
        broken[name] = write_bundle(tmp_path, name, "1.0.0")
        change(broken[name])
    zipped = tmp_path / "zipped.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02")  # what torch.save writes
    broken["torch-save"] = zipped
    for name, path in broken.items():
        with pytest.raises(IdealError) as from_registry:
            read_bundle(path)
        with pytest.raises(IdealError) as from_loader:
            load_bundle(path)
        assert str(from_registry.value) == str(from_loader.value), name
        assert str(from_registry.value).startswith(f"{path}: "), name


def test_register_into_a_user_folder_that_is_a_file_is_a_clear_error(folders, tmp_path):
    shipped, _ = folders
    trained = write_bundle(tmp_path, "my-model", "0.1.0")
    not_a_folder = tmp_path / "models.txt"
    not_a_folder.write_text("a file")
    with pytest.raises(IdealError, match="models.txt: the user model folder is a file"):
        ModelRegistry(not_a_folder, shipped).register(trained)
    assert not_a_folder.read_text() == "a file"


def test_listing_the_shipped_models_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys; from IDEALSegmentLib.registry import ModelRegistry, default_entry; "
        "entries = ModelRegistry(user_dir='/nonexistent').entries(); "
        "print(default_entry(entries).model_id, 'torch' in sys.modules)"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{root / 'IDEALSegment' / 'Logic'}:{root}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [DEFAULT_MODEL_ID, "False"]


def test_select_entry_keeps_the_users_choice_else_the_default(folders):
    from IDEALSegmentLib.registry import entry_key, select_entry

    shipped, user = folders
    write_bundle(shipped, DEFAULT_MODEL_ID, "1.0.0")
    write_bundle(user, "mine", "0.2.0")
    entries = ModelRegistry(user, shipped).entries()
    assert entry_key(select_entry(entries, "mine@0.2.0")) == "mine@0.2.0"
    assert entry_key(select_entry(entries, "gone@9")) == f"{DEFAULT_MODEL_ID}@1.0.0"
    assert select_entry([], "") is None


def test_listing_again_reverifies_nothing_until_a_bundle_changes(folders, monkeypatch):
    """Typing a models-folder path must not re-hash every bundle per keystroke: verification is cached per file stamp."""
    import IDEALTrain.model.registry as registry_module  # the one definition the Logic re-exports

    shipped, user = folders
    write_bundle(shipped, "a", "1.0.0")
    calls = []
    original = registry_module.read_bundle
    monkeypatch.setattr(registry_module, "read_bundle", lambda path: calls.append(path) or original(path))
    registry = ModelRegistry(user, shipped)
    registry.entries()
    registry.user_dir = user / "elsewhere"  # what the panel does when the folder setting changes
    registry.entries()
    registry.entries()
    assert len(calls) == 1


# -- issue 27: companion networks, ids and versions, a full disk -----------------------------------------------------
def _model_with_refinement(folder, name="my-model"):
    """A model folder carrying a valid refinement network, as the shipped model does."""
    trained = write_bundle(folder, name, "0.1.0")
    save_bundle(tiny_refinement_bundle(load_bundle(trained)), trained / REFINEMENT_FOLDER)
    return trained


def _break_refinement(model, how, tmp_path):
    refinement = model / REFINEMENT_FOLDER
    if how == "pickle only":  # a torch.save checkpoint where the network should be
        import shutil

        shutil.rmtree(refinement)
        refinement.mkdir()
        (refinement / "model.pt").write_bytes(b"\x80\x04\x95 pickle that would run code")
    elif how == "pickle beside":
        (refinement / "model.pt").write_bytes(b"\x80\x04\x95 pickle that would run code")
    elif how == "link out":
        secret = tmp_path / "secret.txt"
        secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
        (refinement / "notes.txt").symlink_to(secret)
    elif how == "link loop":
        (refinement / "loop").symlink_to(refinement / "loop")
    elif how == "file":
        import shutil

        shutil.rmtree(refinement)
        refinement.write_text("not a network")
    elif how == "folder loop":
        import shutil

        shutil.rmtree(refinement)
        refinement.symlink_to(refinement)
    elif how == "corrupt":
        weights = refinement / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))


BROKEN_REFINEMENT = {
    "pickle only": "pickle",
    "pickle beside": "pickle-based file model.pt",
    "link out": "symbolic link",
    "link loop": "looping symbolic link",
    "file": "is not a folder",
    "folder loop": "looping symbolic link",
    "corrupt": "checksum",
}


@pytest.mark.parametrize("how", sorted(BROKEN_REFINEMENT))
def test_a_broken_or_unsafe_refinement_network_is_never_copied_and_the_listing_says_so(folders, tmp_path, how, capsys):
    """register copied refinement/ unchecked (a pickle, /etc/passwd through a link); a loop was a traceback; the
    listing showed nothing wrong and a file or a loop silently fell back to level set."""
    from IDEALTrain.cli import main

    shipped, user = folders
    trained = _model_with_refinement(tmp_path)
    _break_refinement(trained, how, tmp_path)
    message = BROKEN_REFINEMENT[how]
    registry = ModelRegistry(user, shipped)
    with pytest.raises(IdealError, match=f"not registered: .*{message}"):
        registry.register(trained)
    assert not user.exists() or list(user.iterdir()) == []  # nothing copied, not even a hidden staging folder
    # the listing shows the model (it still segments) and says its click-to-fix network is refused
    import shutil

    shutil.copytree(trained, user / "listed", symlinks=True)
    entry = registry.entries()[0]
    assert entry.refinement_problem and message in entry.refinement_problem
    assert "click-to-fix network unusable" in entry.display_name and "refused" in entry.training_summary
    assert any("click to fix will refuse it" in p for p in registry.problems)
    assert main(["bundle", "info", str(trained)]) == 2  # bundle info names it too
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_refinement_network_replaced_in_place_is_verified_again_when_listed(folders):
    shipped, user = folders
    model = _model_with_refinement(user)
    registry = ModelRegistry(user, shipped)
    assert registry.entries()[0].refinement_problem is None and registry.problems == []
    _break_refinement(model, "corrupt", None)  # same folder, same names: only the weights changed
    assert "checksum" in registry.entries()[0].refinement_problem


@pytest.mark.parametrize("version", ["../x y", "1.0.0/../../evil", "", "1.0\n"])
def test_register_refuses_a_version_the_listing_would_hide(folders, tmp_path, version):
    shipped, user = folders
    trained = write_bundle(tmp_path, "my-model", "0.1.0")
    registry = ModelRegistry(user, shipped)
    with pytest.raises(IdealError, match="is not a version number"):
        registry.register(trained, version=version)
    assert not user.exists() or list(user.iterdir()) == []
    entry = registry.register(trained, version="0.2.0")
    assert [e.version for e in registry.entries()] == [entry.version]  # what is registered is listed


def test_a_model_id_that_is_a_path_is_refused(folders, tmp_path):
    shipped, user = folders
    for bad in ("../../etc", "a/b", "x" * 101):
        trained = write_bundle(tmp_path, "ok", "0.1.0")
        rewrite_card(trained, id=bad)
        with pytest.raises(IdealError, match="is not a usable name"):
            ModelRegistry(user, shipped).register(trained)
        import shutil

        shutil.rmtree(trained)


@pytest.fixture
def full_user_dir(tmp_path, monkeypatch):
    """A user model folder on a disk with no space left (a real tmpfs where mounting is allowed)."""
    import subprocess
    from pathlib import Path

    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        if mounted:
            with open(folder / ".filler", "wb", buffering=0) as handle, pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 1024)
        else:  # no mount allowed: writes into the folder fail as a full disk would
            import errno

            real = Path.write_bytes

            def full(self, data):
                if folder in self.parents:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(self, data)

            monkeypatch.setattr(Path, "write_bytes", full)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_register_on_a_full_disk_is_one_line_and_copies_nothing(folders, tmp_path, full_user_dir):
    shipped, _ = folders
    trained = _model_with_refinement(tmp_path)
    with pytest.raises(IdealError, match="not registered: .*No space left on device") as caught:
        ModelRegistry(full_user_dir, shipped).register(trained)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in full_user_dir.iterdir()) in ([".filler"], [])  # nothing half-copied
