"""Ingest: OME-Zarr (NGFF 0.4 and 0.5) images read through zarr-python, following the metadata.

An NGFF image is a Zarr group whose attributes describe a multiscale pyramid
(``multiscales[0].datasets[i].path``, level 0 the full resolution) with named axes
(``t``, ``c``, ``z``, ``y``, ``x``; at least ``y`` and ``x``) and, optionally, channel
labels (``omero.channels[i].label``). NGFF 0.4 stores the attributes at the top of a
Zarr v2 group's ``.zattrs``; 0.5 under ``"ome"`` in a Zarr v3 group's ``zarr.json``.
zarr-python opens both and decodes the chunks; this module only reads the metadata
(benchmarks/ingest_ome.py compares it with ome-zarr-py's reader and tensorstore).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scbd_cells.core.errors import DataError

_GROUP_FILES = ("zarr.json", ".zattrs", ".zgroup")


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a Zarr group (an OME-Zarr image, read by metadata)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in _GROUP_FILES
    )


@dataclass(frozen=True)
class OmeZarrImage:
    """What the NGFF metadata of one image says.

    Attributes
    ----------
    array_path
        The Zarr array of the chosen multiscale level.
    axes
        Axis names in array order (e.g. ``("c", "y", "x")``).
    shape
        The level's array shape, in ``axes`` order.
    channel_names
        ``omero.channels[*].label`` when there is one label per channel, else None.
    """

    array_path: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    channel_names: tuple[str, ...] | None

    @property
    def chw_shape(self) -> tuple[int, int, int]:
        """(C, H, W): channels (1 without a ``c`` axis), rows, columns."""
        sizes = dict(zip(self.axes, self.shape, strict=True))
        return sizes.get("c", 1), sizes["y"], sizes["x"]


def _ome_attributes(path: str | os.PathLike) -> dict[str, Any]:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a folder that is no group
        raise DataError(f"{path} is not a readable Zarr group ({error})") from error
    attributes = dict(group.attrs)
    return attributes.get("ome", attributes)  # 0.5 nests the NGFF keys under "ome"


def describe_ome_zarr(path: str | os.PathLike, *, level: int = 0) -> OmeZarrImage:
    """The NGFF metadata of the image at ``path`` for multiscale ``level`` (0 = full size).

    Raises
    ------
    DataError
        Not an NGFF image, no such level, no y/x axes, or more than one time point or
        z-plane (a crop is 2-D; project or pick the plane first).
    """
    import zarr

    attributes = _ome_attributes(path)
    multiscales = attributes.get("multiscales")
    if not multiscales:
        labels = attributes.get("plate") or attributes.get("well") or attributes.get("labels")
        hint = (
            " It is an HCS plate/well or a labels group: name the image group itself "
            "(e.g. plate.zarr/A/1/0)."
            if labels
            else ""
        )
        raise DataError(f"{path} is a Zarr group without NGFF 'multiscales' metadata.{hint}")
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise DataError(
            f"{path} has {len(datasets)} multiscale levels (0..{len(datasets) - 1}); "
            f"level {level} does not exist"
        )
    axes = tuple(
        axis["name"] if isinstance(axis, dict) else str(axis)
        for axis in multiscale.get("axes") or ("t", "c", "z", "y", "x")  # 0.1-0.3: always 5-D
    )
    array_path = os.path.join(str(path), datasets[level]["path"])
    array = zarr.open_array(array_path, mode="r")
    if len(axes) != array.ndim or "y" not in axes or "x" not in axes:
        raise DataError(
            f"{path}: the axes {list(axes)} do not describe its {array.ndim}-D array with y and x"
        )
    sizes = dict(zip(axes, array.shape, strict=True))
    extra = {name: size for name, size in sizes.items() if name not in "cyx" and size != 1}
    if extra:
        raise DataError(
            f"{path} has {extra} (more than one plane along {', '.join(extra)}); ingest reads "
            "2-D fields: write one image per plane or a projection"
        )
    names = None
    channels = (attributes.get("omero") or {}).get("channels") or []
    labels = [str(channel.get("label", "")).strip() for channel in channels]
    n_channels = sizes.get("c", 1)
    if len(labels) == n_channels and all(labels) and len(set(labels)) == n_channels:
        names = tuple(labels)
    return OmeZarrImage(array_path, axes, tuple(array.shape), names)


def read_ome_zarr(path: str | os.PathLike, *, level: int = 0) -> np.ndarray:
    """The (C, H, W) pixels of an OME-Zarr image at multiscale ``level``, in its dtype."""
    import zarr

    image = describe_ome_zarr(path, level=level)
    pixels = zarr.open_array(image.array_path, mode="r")[...]
    order = [image.axes.index(name) for name in ("c", "y", "x") if name in image.axes]
    others = [axis for axis in range(pixels.ndim) if axis not in order]
    pixels = np.transpose(pixels, others + order).reshape(image.chw_shape)  # (C, H, W)
    return pixels
