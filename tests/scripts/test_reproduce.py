"""The reproduction pipeline end to end on the CPU at toy size: two tiny sets, six one-epoch trainings, tests,
report (slow: about two minutes on two cores)."""
import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scripts import reproduce
from util.mesh_io import write_mesh


@pytest.mark.slow
def test_start_finish_and_report_on_tiny_sets(tmp_path):
    root, out = tmp_path / "repro", tmp_path / "out"
    reproduce.main(["start", "--root", str(root), "--gpu", "-1", "--epochs", "2", "--epoch_size", "16",
                    "--print_freq", "8", "--identities", "4", "--poses", "8", "--vertices", "300", "--workers", "2"])
    reproduce.main(["finish", "--root", str(root), "--out", str(out), "--seconds", "600"])

    results = json.loads((out / "results.json").read_text())
    assert results["pairs_seen"] == 32
    assert {(run["set"], run["model"]) for run in results["runs"]} == {
        (set_name, label) for set_name in reproduce.SETS for label, _ in reproduce.MODELS.values()}
    for run in results["runs"]:
        assert run["state"] == "done" and run["wall_s"] > 0 and run["pairs_trained"] == run["pairs_tested"] == 32
        for which in ("unseen", "seen"):
            assert run[which]["pairs"] > 0 and math.isfinite(run[which]["pmd"]) and run[which]["pmd"] > 0
            assert ("warp_pmd" in run[which]) == (run["model"] == "3D-CoreNet")
            assert sum(run[which][f"pmd_{axis}"] for axis in "xyz") / 3 == pytest.approx(run[which]["pmd"])
    for set_name in reproduce.SETS:  # the tiny animal set has one test identity: its pose copy is exact
        for which in ("unseen", "seen"):
            assert results["pose_copy"][set_name][which]["pairs"] > 0
            assert results["pose_copy"][set_name][which]["pmd"] > 0 or set_name == "animal"
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 6 + 2 and table[2].startswith("| human | 3D-CoreNet | 32 | ")
    assert table[-1].startswith("| animal | the pose mesh unchanged (no transfer) | - | ")
    assert all((reproduce.run_dir(root, set_name, model) / "human" / "2_net_G.pth").is_file() == (model == "corenet")
               for set_name in ("human",) for model in reproduce.MODELS)

    pairs, losses = reproduce.loss_curve(reproduce.run_dir(root, "human", "corenet"), "human", 16)
    assert pairs == [8, 16, 24, 32] and all(math.isfinite(loss) and loss > 0 for loss in losses)
    for name, panels in (("test_pairs_human.png", (6, 4)), ("test_pairs_animal.png", (6, 4))):
        picture = np.asarray(Image.open(out / name))
        assert picture.shape[1] == panels[0] * 240 and picture.shape[0] == panels[1] * 300
        assert (picture < 200).any()  # shaded meshes on the white background
    assert Image.open(out / "loss_curves.png").size[0] > 0

    # A second start keeps the finished runs; another schedule in the same root is refused.
    reproduce.main(["start", "--root", str(root), "--gpu", "-1", "--epochs", "2", "--epoch_size", "16",
                    "--print_freq", "8", "--identities", "4", "--poses", "8", "--vertices", "300", "--workers", "2"])
    assert reproduce.run_state(reproduce.run_dir(root, "animal", "npt")) == "done"
    with pytest.raises(ValueError, match="another schedule"):
        reproduce.main(["start", "--root", str(root), "--gpu", "-1", "--epochs", "3"])


def test_pose_copy_pmd_is_the_error_of_the_pose_mesh_itself(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.random((50, 3)) - 0.5
    truth -= (truth.max(axis=0) + truth.min(axis=0)) / 2  # bounding-box centred
    faces = np.array([[0, 1, 2], [2, 3, 4]])
    write_mesh(tmp_path / "truth.obj", truth, faces)
    write_mesh(tmp_path / "same_moved.obj", truth + 7.0, faces)  # centring removes a translation
    write_mesh(tmp_path / "doubled.obj", 2 * truth + 1.0, faces)
    write_mesh(tmp_path / "identity.obj", truth, faces)
    (tmp_path / "list_same").write_text("identity.obj same_moved.obj truth.obj\n")
    (tmp_path / "list_both").write_text("identity.obj same_moved.obj truth.obj\nidentity.obj doubled.obj truth.obj\n")
    assert reproduce.pose_copy_pmd(tmp_path, "list_same")["pmd"] == pytest.approx(0, abs=1e-12)
    both = reproduce.pose_copy_pmd(tmp_path, "list_both")
    expected_axis = (truth ** 2).mean(axis=0) / 2  # (2v - v)^2 for one pair, 0 for the other
    assert both["pairs"] == 2 and both["pmd"] == pytest.approx(expected_axis.mean(), rel=1e-5)
    assert [both[f"pmd_{axis}"] for axis in "xyz"] == pytest.approx(expected_axis.tolist(), rel=1e-5)


def test_commands_on_a_folder_without_a_reproduction_say_so(tmp_path):
    for command in (["report", "--out", str(tmp_path / "out")], ["wait", "--seconds", "1"],
                    ["finish", "--out", str(tmp_path / "out"), "--seconds", "1"]):
        with pytest.raises(FileNotFoundError, match="holds no reproduction .* start --root"):
            reproduce.main([command[0], "--root", str(tmp_path / "none"), *command[1:]])
    assert not (tmp_path / "out").exists()


def test_an_unfinished_set_is_tested_at_the_last_epoch_all_its_models_saved(tmp_path):
    root = tmp_path / "repro"
    root.mkdir()
    (root / "schedule.json").write_text('{"epochs": 8, "epoch_size": 100}')
    files = {"corenet": ["1_net_G.pth", "2_net_G.pth", "3_net_G.pth"], "npt": ["1_net_NPT.pth", "2_net_NPT.pth"],
             "npt_maxpool": [f"{epoch}_net_NPT.pth" for epoch in range(1, 9)]}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    for model, names in files.items():
        directory = reproduce.run_dir(root, "human", model)
        (directory / "human").mkdir(parents=True)
        for name in [*names, "latest_net_G.pth"]:
            (directory / "human" / name).write_bytes(b"")
        status = {"pid": 999999999, "returncode": 0} if model == "npt_maxpool" else {"pid": sleeper.pid}
        (directory / "status.json").write_text(json.dumps(status))
    assert reproduce.choose_checkpoints(root, "human") == 2
    assert sleeper.wait(timeout=10) == -signal.SIGTERM  # the running trainings were stopped
    for model in files:
        tested = json.loads((reproduce.run_dir(root, "human", model) / "tested.json").read_text())
        assert tested == {"which_epoch": 2, "pairs": 200, "stopped": model != "npt_maxpool"}
    assert reproduce.choose_checkpoints(root, "animal") == 0  # nothing started there
