"""Test options: the published test flags on top of BaseOptions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from options.base_options import BaseOptions, option


@dataclass(frozen=True)
class TestOptions(BaseOptions):
    __test__: ClassVar[bool] = False  # not a pytest test class despite its name
    results_dir: str = option("./test_results/", "output meshes and the PMD table go to <results_dir>/<dataset_mode>")
    which_epoch: str = option("latest", "which checkpoint to load: <which_epoch>_net_G.pth and _net_Corr.pth")
    test_list: str = option("", "file of 'identity pose ground-truth' lines (default: the published "
                            "<dataset_mode>_test_list at the project root)")
    no_shuffle: bool = option(False, "feed vertices in file order instead of a seeded random permutation")
