"""The idealtrain command line: every command end to end, and one clear line on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import oblique_image, tiny_bundle

from IDEALTrain.cli import main
from IDEALTrain.io.volume_files import read_image, write_image
from IDEALTrain.model.bundle import Bundle, load_bundle, read_card, save_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_bundle(tiny_bundle(), tmp_path_factory.mktemp("bundle") / "tiny.zip")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    assert main(["phantom", "--out", str(out), "--cases", "2", "--seed", "4"]) == 0
    return out


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("idealtrain: error: ")
    return lines[0]


def test_phantom_writes_matching_pairs(phantoms):
    images = sorted(p.name for p in (phantoms / "images").iterdir())
    assert images == ["phantom_0000.nii.gz", "phantom_0001.nii.gz"]
    assert images == sorted(p.name for p in (phantoms / "labels").iterdir())


def test_segment_writes_on_the_input_grid_and_never_overwrites(bundle_path, phantoms, tmp_path, capsys):
    source = phantoms / "images" / "phantom_0000.nii.gz"
    out, uncertainty = tmp_path / "case.seg.nrrd", tmp_path / "case_uncertainty.nii.gz"
    args = ["segment", "--model", str(bundle_path), "--input", str(source), "--output", str(out), "--uncertainty", str(uncertainty), "--device", "cpu"]
    assert main(args) == 0
    image = read_image(source)
    assert read_image(out).same_grid(image, tolerance=1e-5) and read_image(uncertainty).same_grid(image, tolerance=1e-5)
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in _error_line(capsys)
    assert out.read_bytes() == before


def test_segment_every_frame_of_a_cine_file(bundle_path, tmp_path, capsys):
    frames = [oblique_image().with_array(oblique_image(seed=t).array).to_sitk() for t in range(3)]
    cine = sitk.JoinSeries(frames)
    source = tmp_path / "cine.nii.gz"
    sitk.WriteImage(cine, str(source))
    assert main(["segment", "--model", str(bundle_path), "--input", str(source), "--output", str(tmp_path / "out.nii.gz"), "--all-frames", "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.glob("out_frame*")) == ["out_frame00.nii.gz", "out_frame01.nii.gz", "out_frame02.nii.gz"]
    printed = capsys.readouterr()  # a cine is measured whole (or says why not)
    assert "measurements of" in printed.out or "no measurements" in printed.err


def test_score_and_evaluate(bundle_path, phantoms, tmp_path, capsys):
    label = phantoms / "labels" / "phantom_0001.nii.gz"
    assert main(["score", "--pred", str(label), "--ref", str(label)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["unit"] == "mm" and scores["mean"]["dice"] == 1.0 and scores["mean"]["hd95"] == 0.0
    results = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(bundle_path), "--data", f"folder:{phantoms}", "--out", str(results), "--device", "cpu"]) == 0
    saved = json.loads(results.read_text())
    assert set(saved["cases"]) == {"phantom_0000", "phantom_0001"} and saved["mean"]["volumes"] == 2
    assert "LV_Myocardium" in capsys.readouterr().err  # the per-structure table


def test_score_and_evaluate_treat_a_structure_missing_from_the_reference_as_not_applicable(bundle_path, phantoms, tmp_path, capsys):
    """A reference without RV (like Sunnybrook's) gives RV "not applicable": never Dice 0, never in the mean."""
    from IDEALTrain.io.volume_files import read_label

    label = read_label(phantoms / "labels" / "phantom_0001.nii.gz")
    no_rv = label.with_array(np.where(label.array == 1, 0, label.array).astype(np.uint8))
    write_image(no_rv, tmp_path / "ref.nii.gz")
    assert main(["score", "--pred", str(phantoms / "labels" / "phantom_0001.nii.gz"), "--ref", str(tmp_path / "ref.nii.gz")]) == 0
    captured = capsys.readouterr()
    scores = json.loads(captured.out)
    assert scores["classes"]["RV"]["applicable"] is False and scores["classes"]["RV"]["dice"] is None
    assert scores["mean"]["dice"] == 1.0
    assert "not in the reference" in captured.err
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    shutil.copy(phantoms / "images" / "phantom_0001.nii.gz", data / "images" / "phantom_0001.nii.gz")
    write_image(no_rv, data / "labels" / "phantom_0001.nii.gz")
    results = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(bundle_path), "--data", f"folder:{data}", "--out", str(results), "--device", "cpu"]) == 0
    saved = json.loads(results.read_text())
    assert saved["mean"]["classes"]["RV"]["dice"] is None and saved["mean"]["not_applicable"]["RV"] == 1
    assert saved["mean"]["mean"]["dice"] == pytest.approx(
        np.mean([saved["mean"]["classes"][n]["dice"] for n in ("LV", "LV_Myocardium")]))


def test_train_with_json_progress_then_bundle_info(phantoms, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["train", "--data", f"folder:{phantoms}", "--iterations", "3", "--out", str(out), "--progress-json", "--device", "cpu",
            "--base-channels", "4", "--depth", "3", "--inplane", "spacing", "--spacing", "4", "--batch-size", "2",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    assert main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["iteration"] for e in progress] == [1, 2, 3] and all(e["total"] == 3 and "loss" in e and "eta_s" in e for e in progress)
    assert [e["iteration"] for e in events if e["event"] == "checkpoint"] == [2, 3]
    assert events[-1] == {"event": "done", "bundle": str(out)}
    assert main(["bundle", "info", str(out)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["training"]["recipe"]["iterations"] == 3 and card["architecture"]["base_channels"] == 4
    assert card["training"]["recipe"]["augmentation"]["rotation_degrees"] == 20.0


def test_bundle_edit_keeps_the_training_record(bundle_path, tmp_path, capsys):
    external = tmp_path / "external.json"
    external.write_text(json.dumps({"sunnybrook": {"lv_dice": 0.9}}))
    out = tmp_path / "edited"
    args = ["bundle", "edit", str(bundle_path), "--out", str(out), "--version", "2.0.0", "--licence", "CC-BY-NC-SA-4.0",
            "--description", "for tests", "--validation-json", str(external), "--half"]
    assert main(args) == 0
    original, edited = read_card(bundle_path), read_card(out)
    assert (edited["version"], edited["licence"], edited["description"]) == ("2.0.0", "CC-BY-NC-SA-4.0", "for tests")
    assert edited["id"] == original["id"] and edited["training"] == original["training"]
    assert edited["validation"]["external"] == {"sunnybrook": {"lv_dice": 0.9}} and edited["weights"]["dtype"] == "float16"
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # never replaced silently


def test_bundle_edit_sets_the_postprocessing(bundle_path, tmp_path):
    out = tmp_path / "cleaned"
    assert main(["bundle", "edit", str(bundle_path), "--out", str(out), "--largest-component", "on"]) == 0
    assert read_card(out)["postprocessing"] == {"largest_heart_component": True}
    assert read_card(bundle_path)["postprocessing"] == {"largest_heart_component": False}


def test_finetune_init_from_continues_the_whole_model(phantoms, tmp_path, capsys):
    data = f"folder:{phantoms}"
    common = ["--iterations", "1", "--device", "cpu", "--batch-size", "2"]
    first = tmp_path / "first"
    assert main(["train", "--data", data, "--out", str(first), "--base-channels", "4", "--depth", "3",
                 "--inplane", "spacing", "--spacing", "4", "--largest-component", "on", *common]) == 0
    second = tmp_path / "second"
    finetune = ["finetune", "--labeled", data, "--unlabeled", data, "--unlabeled-includes-labeled", "--unlabeled-batch-size", "2", "--lr", "0"]
    args = [*finetune, "--init-from", str(first)]
    assert main([*args, "--out", str(second), *common]) == 0
    before, after = load_bundle(first), load_bundle(second)
    # Architecture, preprocessing and postprocessing come from the model; with lr 0 only batch-norm statistics move.
    assert after.network == before.network and after.preprocessing == before.preprocessing
    assert after.postprocessing.largest_heart_component and after.training["initial_model"]["id"] == before.model_id
    learned = [name for name in before.weights if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(before.weights[name], after.weights[name]) for name in learned)
    assert main([*args, "--out", str(tmp_path / "off"), "--largest-component", "off", *common]) == 0
    assert not load_bundle(tmp_path / "off").postprocessing.largest_heart_component
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "wider"), "--base-channels", "8", *common]) == 2
    assert "another architecture" in _error_line(capsys)
    encoder = tmp_path / "encoder"
    save_bundle(Bundle(before.network, before.preprocessing, {k: v for k, v in before.weights.items() if k.startswith("encoder.")},
                       kind="pretrained-encoder"), encoder)
    assert main([*finetune, "--init-from", str(encoder), "--out", str(tmp_path / "x"), *common]) == 2
    assert "--init-from takes a segmentation model" in _error_line(capsys)
    assert main([*args, "--pretrained", str(encoder), "--out", str(tmp_path / "y"), *common]) == 2
    assert "choose one" in _error_line(capsys)
    architecture = ["--base-channels", "4", "--depth", "3", "--inplane", "spacing", "--spacing", "4"]
    mixed = tmp_path / "mixed"
    assert main([*finetune, "--pretrained", str(encoder), "--pretrained-mix", "0.5", *architecture, "--out", str(mixed), *common]) == 0
    assert load_bundle(mixed).training["recipe"]["pretrained_mix"] == 0.5
    capsys.readouterr()
    assert main([*finetune, "--pretrained-mix", "0.5", *architecture, "--out", str(tmp_path / "z"), *common]) == 2
    assert "needs a pretrained encoder" in _error_line(capsys)


@pytest.mark.parametrize(
    "args,message",
    [
        (["segment", "--model", "{bundle}", "--input", "{tmp}/absent.nii.gz"], "no such file"),
        (["segment", "--model", "{tmp}/evil.pt", "--input", "{image}"], "pickle"),
        (["segment", "--model", "{bundle}", "--input", "{flat}"], "constant"),
        (["score", "--pred", "{labels}", "--ref", "{other_labels}"], "different voxel grids"),
        (["score", "--pred", "{image}", "--ref", "{labels}"], "is it an intensity image?"),
        (["score", "--pred", "{labels}", "--ref", "{five}"], "outside the label map"),
        (["evaluate", "--model", "{bundle}", "--data", "acdc:{tmp}", "--out", "{tmp}/r.json"], "invalid data spec"),
        (["bundle", "info", "{tmp}"], "not a model bundle"),
    ],
)
def test_bad_input_is_one_clear_line(bundle_path, tmp_path, capsys, args, message):
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04junk")
    image = write_image(oblique_image(), tmp_path / "image.nrrd")
    other = write_image(oblique_image((6, 40, 48)), tmp_path / "other.nrrd")
    flat = write_image(oblique_image().with_array(np.ones((7, 40, 48), np.float32)), tmp_path / "flat.nii.gz")
    labels = write_image(oblique_image().with_array(np.zeros((7, 40, 48), np.uint8)), tmp_path / "labels.nrrd")
    other_labels = write_image(oblique_image((6, 40, 48)).with_array(np.zeros((6, 40, 48), np.uint8)), tmp_path / "o.nrrd")
    five = write_image(oblique_image().with_array(np.full((7, 40, 48), 5, np.uint8)), tmp_path / "five.nrrd")
    values = {"bundle": bundle_path, "tmp": tmp_path, "image": image, "other": other, "flat": flat, "labels": labels,
              "other_labels": other_labels, "five": five}
    assert main([a.format(**values) for a in args]) == 2
    assert message in _error_line(capsys)


def test_module_and_help_run_as_programs():
    result = subprocess.run([sys.executable, "-m", "IDEALTrain", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("phantom", "segment", "evaluate", "train", "score", "bundle", "demo"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "IDEALTrain", "segment"], capture_output=True, text=True)
    assert result.returncode == 2 and "--model" in result.stderr


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(phantoms, tmp_path):
    import signal

    from safetensors.torch import load_file

    common = ["--data", f"folder:{phantoms}", "--iterations", "40", "--device", "cpu", "--base-channels", "4", "--depth", "3",
              "--inplane", "spacing", "--spacing", "4", "--batch-size", "2", "--checkpoint-every", "1000", "--progress-json"]
    program = [sys.executable, "-m", "IDEALTrain", "train"]
    subprocess.run(program + common + ["--out", str(tmp_path / "straight")], check=True, capture_output=True)

    checkpoints = tmp_path / "ckpt"
    run = subprocess.Popen(program + common + ["--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(checkpoints)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:
        if json.loads(line).get("iteration") == 5:
            run.send_signal(signal.SIGTERM)
            break
    run.stdout.read()
    assert run.wait(timeout=60) == 3, run.stderr.read()
    assert (checkpoints / "last.safetensors").is_file() and not (tmp_path / "resumed").exists()
    subprocess.run(program + common + ["--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(checkpoints), "--resume"],
                   check=True, capture_output=True)
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k].numpy(), resumed[k].numpy()) for k in straight)


def test_two_gloo_processes_train_in_step(phantoms, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "IDEALTrain",
               "finetune", "--labeled", f"folder:{phantoms}", "--labeled-slices", "1", "--iterations", "3", "--out", str(out),
               "--base-channels", "4", "--depth", "3", "--inplane", "spacing", "--spacing", "4", "--batch-size", "2",
               "--unlabeled-batch-size", "2", "--encoder-warmup", "1", "--progress-json", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    done = [json.loads(line) for line in result.stdout.splitlines() if '"done"' in line]
    assert done == [{"event": "done", "bundle": str(out)}]  # rank 0 alone writes the bundle
    training = json.loads((out / "card.json").read_text())["training"]
    assert training["processes"] == 2 and training["ranks_agree"] is True
    assert training["recipe"]["encoder_warmup"] == 1


def test_pretrain_records_its_contrastive_options(phantoms, tmp_path, capsys):
    out = tmp_path / "encoder"
    assert main(["pretrain", "--data", f"folder:{phantoms}", "--iterations", "2", "--batch-size", "2", "--out", str(out),
                 "--base-channels", "4", "--depth", "3", "--size", "32", "--samples-per-image", "8",
                 "--negative-min-distance", "1.5", "--same-image-negatives", "--device", "cpu", "--progress-json"]) == 0
    recipe = load_bundle(out).training["recipe"]
    assert recipe["negative_min_distance"] == 1.5 and recipe["samples_per_image"] == 8 and recipe["same_image_negatives"] is True
    capsys.readouterr()
    assert main(["pretrain", "--data", f"folder:{phantoms}", "--iterations", "2", "--out", str(tmp_path / "queued"),
                 "--same-image-negatives", "--queue-size", "64", "--device", "cpu"]) == 2
    assert "queue" in capsys.readouterr().err and not (tmp_path / "queued").exists()
