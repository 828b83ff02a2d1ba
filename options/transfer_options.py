"""Transfer options: which meshes transfer.py reads and writes, on top of BaseOptions.

Two forms, one per run:
    single pair: --identity A --pose B --out C [--render C.png]
    batch:       --pairs LIST and/or --identity_dir D1 --pose_dir D2 --out_dir D3 [--render_dir R]
A LIST holds "identity pose output" lines (whitespace-separated, paths relative to the list's folder);
the folders give every identity x every pose, written as <identity-stem>_in_<pose-stem>.obj.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from options.base_options import BaseOptions, option
from util.mesh_io import OUTPUT_SUFFIXES

SINGLE_FLAGS = ("identity", "pose", "out")
FOLDER_FLAGS = ("identity_dir", "pose_dir", "out_dir")


def _flags(names: tuple[str, ...]) -> str:
    return "/".join(f"--{name}" for name in names)


def _given(options: BaseOptions, names: tuple[str, ...]) -> bool:
    """Whether any of the flags is set; if some are, all must be."""
    missing = tuple(name for name in names if not getattr(options, name))
    if missing and len(missing) < len(names):
        raise ValueError(f"{_flags(names)} go together; {_flags(missing)} is missing")
    return not missing


@dataclass(frozen=True)
class TransferOptions(BaseOptions):
    identity: str = option("", "identity mesh: the body to keep (any format trimesh reads, any vertex count)")
    pose: str = option("", "pose mesh: the pose to give it (any format trimesh reads, any vertex count)")
    out: str = option("", f"output mesh ({', '.join(OUTPUT_SUFFIXES)}): the identity's faces and vertex order")
    pairs: str = option("", "batch: file of 'identity pose output' lines; relative paths are resolved "
                        "against the file's folder")
    identity_dir: str = option("", "batch: folder of identity meshes, each transferred to every pose in --pose_dir")
    pose_dir: str = option("", "batch: folder of pose meshes")
    out_dir: str = option("", "batch: outputs of --identity_dir x --pose_dir, named <identity>_in_<pose>.obj")
    which_epoch: str = option("latest", "which checkpoint to load: <which_epoch>_net_*.pth")
    rescale: bool = option(False, "scale each input to the training meshes' bounding-box diagonal "
                           "(data_stats.json) and the output back to the identity's scale")
    render: str = option("", "single pair: also write a PNG of identity | pose | warp | output")
    render_dir: str = option("", "batch: also write one PNG per pair, named after its output, into this folder")
    overwrite: bool = option(False, "replace outputs (and renders) that already exist")

    def validate(self) -> None:
        """One form per run, each complete; a render only with its form; known output suffixes."""
        super().validate()
        single = _given(self, SINGLE_FLAGS)
        batch = _given(self, FOLDER_FLAGS) or bool(self.pairs)
        if single and batch:
            raise ValueError("give either one pair (--identity/--pose/--out) or a batch (--pairs, "
                             "--identity_dir/--pose_dir/--out_dir), not both")
        if not single and not batch:
            raise ValueError(f"nothing to transfer: give {_flags(SINGLE_FLAGS)}, --pairs, or {_flags(FOLDER_FLAGS)}")
        if self.render and not single:
            raise ValueError("--render names one picture for a single pair; for a batch use --render_dir")
        if self.render_dir and not batch:
            raise ValueError("--render_dir is for a batch; for a single pair use --render PATH.png")
        if self.render and Path(self.render).suffix.lower() != ".png":
            raise ValueError(f"--render {self.render} must end in .png")
        if self.out and Path(self.out).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"--out {self.out} must end in one of {', '.join(OUTPUT_SUFFIXES)}")
