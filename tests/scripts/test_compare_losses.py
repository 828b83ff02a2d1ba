"""scripts/compare_losses.py: the last steps' mean loss per path and each path's comparison with the reference."""
import math
import statistics

import pytest

from scripts.compare_losses import last_mean, paired_difference, relative_difference, window_means
from tests.cli import assert_one_line_error, run_script


def write_log(path, totals):
    """A loss_log.txt whose logged steps have rec + edge = each of totals (edge fixed at 0.5)."""
    lines = ["================ Training Loss (Wed Nov 25 13:34:25 2026) ================"]
    lines += [f"(epoch: 1, iters: {8 * (i + 1)}, time: 0.03) edge: 0.5000 rec: {total - 0.5:.4f} lr: 0.0001"
              for i, total in enumerate(totals)]
    path.write_text("\n".join(lines) + "\n")


def test_last_mean_averages_rec_plus_edge_of_the_last_steps(tmp_path):
    write_log(tmp_path / "loss_fast_seed1.txt", [100.0, 10.0, 20.0, 30.0])
    assert last_mean(tmp_path / "loss_fast_seed1.txt", 3) == pytest.approx(20.0)
    assert last_mean(tmp_path / "loss_fast_seed1.txt", 200) == pytest.approx(40.0)


def test_relative_difference_and_its_standard_error():
    fast, reference = [9.0, 11.0, 13.0], [10.0, 10.0, 10.0]
    ratio, error = relative_difference(fast, reference)
    assert ratio == pytest.approx(0.1)
    assert error == pytest.approx(math.sqrt(statistics.variance(fast) / 3) / 10.0)
    assert math.isnan(relative_difference([9.0], [10.0])[1])


def test_paired_difference_compares_each_seed_with_itself():
    """Seeds whose runs differ a lot from each other but little between the paths: the paired error is small where
    the unpaired one is not; a seed one path lacks is left out."""
    fast, reference = {1: 5.5, 2: 11.0, 3: 16.5, 4: 99.0}, {1: 5.0, 2: 10.0, 3: 15.0}
    differences, difference, error = paired_difference(fast, reference)
    assert list(differences) == [1, 2, 3] and differences[2] == pytest.approx(0.1)
    assert difference == pytest.approx(0.1) and error == pytest.approx(0.0, abs=1e-12)
    assert relative_difference([5.5, 11.0, 16.5], [5.0, 10.0, 15.0])[1] > 0.3
    _, difference, error = paired_difference({1: 9.0, 2: 12.0}, {1: 10.0, 2: 10.0})
    assert difference == pytest.approx(0.05) and error == pytest.approx(statistics.stdev([-0.1, 0.2]) / math.sqrt(2))
    assert math.isnan(paired_difference({1: 9.0}, {1: 10.0})[2])
    assert paired_difference({1: 9.0}, {2: 10.0})[0] == {}


def test_the_script_prints_each_path_and_the_comparison(tmp_path):
    for path, seed, totals in [("fast", 1, [9.0]), ("fast", 2, [11.0]), ("reference", 1, [10.0]),
                               ("reference", 2, [10.0])]:
        write_log(tmp_path / f"loss_{path}_seed{seed}.txt", totals)
    result = run_script("scripts/compare_losses.py", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "fast       seeds [1, 2]: last-200 mean loss 10.0000" in result.stdout
    assert "fast / reference - 1 = +0.00%, standard error 10.00%" in result.stdout
    assert ("paired by seed [1, 2]: mean of fast / reference - 1 = +0.00%, standard error 10.00% (per seed -10.0%, "
            "+10.0%)") in result.stdout


def test_every_other_path_is_compared_with_the_reference(tmp_path):
    """storedfp32 (the faithful float32 summed in another order) beside fast: each gets its own comparison."""
    for path, seed, total in [("fast", 1, 11.0), ("storedfp32", 1, 9.0), ("reference", 1, 10.0)]:
        write_log(tmp_path / f"loss_{path}_seed{seed}.txt", [total])
    result = run_script("scripts/compare_losses.py", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "fast / reference - 1 = +10.00%" in result.stdout
    assert "storedfp32 / reference - 1 = -10.00%" in result.stdout
    assert "mean of storedfp32 / reference - 1 = -10.00%" in result.stdout


def test_window_means_end_at_the_last_step_and_drop_a_short_first_remainder(tmp_path):
    write_log(tmp_path / "loss_fast_seed1.txt", [100.0, 1.0, 3.0, 5.0, 7.0])
    assert window_means(tmp_path / "loss_fast_seed1.txt", 2) == [(24, 2.0), (40, 6.0)]
    assert window_means(tmp_path / "loss_fast_seed1.txt", 2, until=32) == [(16, 50.5), (32, 4.0)]


def test_windows_compare_each_seed_over_every_window(tmp_path):
    write_log(tmp_path / "loss_reference_seed1.txt", [10.0, 10.0, 20.0, 20.0])
    write_log(tmp_path / "loss_fast_seed1.txt", [11.0, 11.0, 19.0, 19.0])
    result = run_script("scripts/compare_losses.py", str(tmp_path), "--last", "2", "--windows")
    assert result.returncode == 0, result.stderr
    assert ("fast / reference - 1, seed 1, windows of 2 logged steps ending at pairs 16: +10.0%, 32: -5.0%"
            in result.stdout)
    assert "windows of" not in run_script("scripts/compare_losses.py", str(tmp_path), "--last", "2").stdout


def test_no_logs_and_empty_logs_are_one_line_errors(tmp_path):
    result = run_script("scripts/compare_losses.py", str(tmp_path))
    assert_one_line_error(result.returncode, result.stderr, "no loss_<path>_seed<k>.txt logs", str(tmp_path))
    (tmp_path / "loss_fast_seed1.txt").write_text("================ Training Loss ================\n")
    result = run_script("scripts/compare_losses.py", str(tmp_path))
    assert_one_line_error(result.returncode, result.stderr, "loss_fast_seed1.txt has no logged training steps")


def test_runs_that_stopped_early_are_compared_over_the_pairs_every_run_reached(tmp_path):
    """A reference run cut off after 3 of 5 logged steps: the fast runs' means are taken up to the same point,
    and the output says so."""
    write_log(tmp_path / "loss_fast_seed1.txt", [100.0, 12.0, 8.0, 1.0, 1.0])
    write_log(tmp_path / "loss_reference_seed1.txt", [100.0, 10.0, 10.0])
    assert last_mean(tmp_path / "loss_fast_seed1.txt", 2, until=24) == pytest.approx(10.0)
    result = run_script("scripts/compare_losses.py", str(tmp_path), "--last", "2")
    assert result.returncode == 0, result.stderr
    assert ("the runs stopped at different points (loss_reference_seed1.txt at 24 pairs, loss_fast_seed1.txt at "
            "40); every mean below is over the last 2 logged steps up to 24 pairs") in result.stdout
    assert "fast       seeds [1]: last-2 mean loss 10.0000" in result.stdout
    assert "fast / reference - 1 = +0.00%" in result.stdout


def test_the_same_run_in_two_folders_is_a_one_line_error(tmp_path):
    """Two logs of one path and seed would otherwise leave one of them out of every mean without a word."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_log(tmp_path / folder / "loss_reference_seed1.txt", [10.0])
    result = run_script("scripts/compare_losses.py", str(tmp_path / "a"), str(tmp_path / "b"))
    assert_one_line_error(result.returncode, result.stderr, "two logs of reference seed 1",
                          "pass folders that hold each path's seed once")
