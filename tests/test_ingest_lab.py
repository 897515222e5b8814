"""Ingest of a lab's screen as its tools wrote it: CellProfiler tables, OME-Zarr/OME-TIFF, masks.

Each input is built the way the other tool writes it (ExportToSpreadsheet's column names,
ome-zarr-py's writer, a label image drawn with skimage.draw), and every stored crop is
compared with the pixels cut from the source by hand.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from scbd_cells import ingest, open_store
from scbd_cells.cli import app
from scbd_cells.core.errors import DataError, InputError
from scbd_cells.data import schema
from scbd_cells.embedding.encode import embed
from scbd_cells.model.scbd import DEFAULT_MODEL_ARGS, SCBDModel
from scbd_cells.training.checkpoint import save_checkpoint

CROP = 8
FIELD = (40, 48)  # (H, W)
CHANNELS = ("DNA", "Actin", "Mito")


def crop_of(field: np.ndarray, x: float, y: float, size: int = CROP) -> np.ndarray | None:
    """The crop DESIGN.md defines (rows rint(y) - S//2 ...), or None if it leaves the field."""
    top, left = int(np.rint(y)) - size // 2, int(np.rint(x)) - size // 2
    if top < 0 or left < 0 or top + size > field.shape[-2] or left + size > field.shape[-1]:
        return None
    return field[..., top : top + size, left : left + size]


def cellprofiler_screen(root: Path, *, n_images: int = 4, seed: int = 0) -> dict:
    """CellProfiler's ExportToSpreadsheet output: Image.csv, Nuclei.csv and one TIFF per channel.

    The image table holds ``ImageNumber``, ``Metadata_*`` (plates with leading zeros),
    ``FileName_<ch>``/``PathName_<ch>`` with paths relative to an image root (not the
    tables' folder) and ``URL_<ch>``; the object table ``ImageNumber``, ``ObjectNumber``,
    ``Location_Center_X/Y`` and a measurement. Returns the paths and the fields.
    """
    rng = np.random.default_rng(seed)
    image_root, table_dir = root / "images", root / "tables"
    table_dir.mkdir(parents=True)
    images, objects, fields = [], [], {}
    for image_number in range(1, n_images + 1):
        plate = "0001" if image_number <= n_images // 2 else "0002"
        well = ["A01", "B02"][image_number % 2]
        folder = f"plate{plate}/{well}"
        (image_root / folder).mkdir(parents=True, exist_ok=True)
        field = rng.integers(0, 60000, (len(CHANNELS), *FIELD), dtype=np.uint16)
        fields[image_number] = field
        row = {
            "ImageNumber": image_number,
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_Site": "01" if image_number != 2 else None,  # one empty field
            "Metadata_Gene": ["ACTB", "nontargeting"][image_number % 2],
        }
        for c, channel in enumerate(CHANNELS):
            name = f"r0{image_number}c01f01p01-{channel}.tiff"
            tifffile.imwrite(image_root / folder / name, field[c], photometric="minisblack")
            row[f"FileName_{channel}"] = name
            row[f"PathName_{channel}"] = folder
            row[f"URL_{channel}"] = f"file:///elsewhere/{folder}/{name}"
        n_objects = 6
        row["Count_Nuclei"] = n_objects
        images.append(row)
        for object_number in range(1, n_objects + 1):
            objects.append(
                {
                    "ImageNumber": image_number,
                    "ObjectNumber": object_number,
                    "Location_Center_X": rng.uniform(0, FIELD[1] - 0.01),
                    "Location_Center_Y": rng.uniform(0, FIELD[0] - 0.01),
                    "AreaShape_Area": float(rng.integers(50, 300)),
                }
            )
    image_table, object_table = table_dir / "Image.csv", table_dir / "Nuclei.csv"
    pd.DataFrame(images).to_csv(image_table, index=False)
    pd.DataFrame(objects).to_csv(object_table, index=False)
    return {
        "image_table": image_table,
        "object_table": object_table,
        "image_root": image_root,
        "fields": fields,
        "objects": pd.DataFrame(objects),
        "images": pd.DataFrame(images),
    }


def _untrained_run(run_dir: Path, store_path: Path) -> Path:
    """A checkpoint of an untrained tiny model for the store (embed needs no training)."""
    torch.manual_seed(0)
    store = open_store(store_path)
    model_args = dict(
        DEFAULT_MODEL_ARGS,
        encoder="tiny",
        in_channels=store.n_channels,
        image_size=store.image_size[0],
        z_dim=4,
    )
    obs = store.obs
    save_checkpoint(
        {
            "model": SCBDModel(model_args).state_dict(),
            "model_args": model_args,
            "step": 1,
            "best_val_loss": 0.0,
            "config": {"alpha": 1.0},
            "store_fingerprint": store.fingerprint(),
            "vocab": {
                "perturbation": [str(c) for c in obs[schema.PERTURBATION].cat.categories],
                "batch": [str(c) for c in obs[schema.BATCH].cat.categories],
            },
            "channel_stats": store.channel_stats,
            "batch_channel_stats": None,
        },
        run_dir / "checkpoints" / "best.pt",
    )
    return run_dir


# ---------------------------------------------------------------------------
# CellProfiler tables
# ---------------------------------------------------------------------------


def test_cellprofiler_image_and_object_tables_to_store_and_embedding(tmp_path: Path) -> None:
    screen = cellprofiler_screen(tmp_path)
    result = ingest(
        screen["object_table"],
        out=tmp_path / "store.zarr",
        image_table=screen["image_table"],
        image_root=screen["image_root"],
        channels=["Actin", "DNA"],  # chosen and ordered; Mito left out
        perturbation_column="Metadata_Gene",
        batch_columns=["Metadata_Plate", "Metadata_Well"],
        crop_size=CROP,
        split_fractions=(1.0, 0.0, 0.0),
    )
    store = open_store(result.store_path)
    assert store.channel_names == ["Actin", "DNA"]
    objects = screen["objects"]
    expected_border = 0
    expected = {}
    for row in objects.itertuples():
        field = screen["fields"][row.ImageNumber][[1, 0]]  # Actin, DNA
        crop = crop_of(field, row.Location_Center_X, row.Location_Center_Y)
        if crop is None:
            expected_border += 1
        else:
            expected[f"{row.ImageNumber}_{row.ObjectNumber}"] = crop
    assert result.n_border == expected_border > 0
    obs = store.obs
    assert sorted(obs[schema.CELL_ID]) == sorted(expected)
    images = store.read(np.arange(store.n_cells))
    for position, cell_id in enumerate(obs[schema.CELL_ID]):
        np.testing.assert_array_equal(images[position], expected[cell_id])
    # Metadata kept as the table's text (leading zeros), the numbers as numbers
    by_id = obs.set_index(schema.CELL_ID)
    image_table = screen["images"].set_index("ImageNumber")
    for cell_id in expected:
        image_number, object_number = map(int, cell_id.split("_"))
        assert by_id.loc[cell_id, "ImageNumber"] == image_number
        assert by_id.loc[cell_id, "ObjectNumber"] == object_number
        plate = image_table.loc[image_number, "Metadata_Plate"]
        assert by_id.loc[cell_id, "Metadata_Plate"] == plate
    assert set(obs["Metadata_Plate"]) == {"0001", "0002"}
    assert set(obs["Metadata_Site"].dropna()) == {"01"}
    assert obs["Metadata_Site"].isna().sum() == (obs["ImageNumber"] == 2).sum() > 0
    assert set(obs[schema.BATCH].astype(str)) <= {"0001_A01", "0001_B02", "0002_A01", "0002_B02"}

    # ... and on into the embedding's obs, unchanged
    run_dir = _untrained_run(tmp_path / "run", result.store_path)
    embed(run_dir, result.store_path, out=tmp_path / "cells.h5ad", device="cpu", workers=1)
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert list(cells.obs[schema.CELL_ID].astype(str)) == list(obs[schema.CELL_ID])
    for column in ("ImageNumber", "ObjectNumber"):
        np.testing.assert_array_equal(cells.obs[column].to_numpy(), obs[column].to_numpy())
    for column in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Gene"):
        written = cells.obs[column].astype(object).where(cells.obs[column].notna(), None)
        assert list(written) == list(obs[column].where(obs[column].notna(), None)), column


def test_cellprofiler_merged_table_from_the_cli(tmp_path: Path) -> None:
    """One merged table, ``Image_``/``Nuclei_`` prefixes, every image pair read by default."""
    screen = cellprofiler_screen(tmp_path)
    merged = screen["objects"].merge(screen["images"], on="ImageNumber")
    merged = merged.rename(
        columns={
            **{c: f"Image_{c}" for c in screen["images"].columns if c != "ImageNumber"},
            "Location_Center_X": "Nuclei_Location_Center_X",
            "Location_Center_Y": "Nuclei_Location_Center_Y",
        }
    )
    table = tmp_path / "tables" / "merged.csv"
    merged.to_csv(table, index=False)
    common = [
        "ingest", str(table), "--out", str(tmp_path / "merged.zarr"),
        "--image-root", str(screen["image_root"]),
        "--perturbation-column", "Image_Metadata_Gene",
        "--batch-columns", "Image_Metadata_Plate,Image_Metadata_Well",
        "--crop-size", str(CROP), "--workers", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, common)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "merged.zarr")
    assert store.channel_names == list(CHANNELS)
    assert set(store.obs["Image_Metadata_Plate"]) == {"0001", "0002"}
    first = store.obs.iloc[0]
    field = screen["fields"][int(first["ImageNumber"])]
    np.testing.assert_array_equal(
        store.read([0])[0],
        crop_of(field, first["Nuclei_Location_Center_X"], first["Nuclei_Location_Center_Y"]),
    )

    # two objects' centroids: which one is for the lab to say
    merged["Cells_Location_Center_X"] = merged["Nuclei_Location_Center_X"]
    merged["Cells_Location_Center_Y"] = merged["Nuclei_Location_Center_Y"]
    merged.to_csv(table, index=False)
    result = CliRunner().invoke(app, [*common, "--overwrite"])
    assert isinstance(result.exception, InputError)  # cli.main: exit 2, no traceback
    assert "Cells_Location_Center_X" in str(result.exception)
    assert "--x-column" in str(result.exception)


def test_cell_id_column_and_image_table_problems(tmp_path: Path) -> None:
    screen = cellprofiler_screen(tmp_path, n_images=2)
    objects = screen["objects"].assign(
        Metadata_CellID=[f"id{k:04d}" for k in range(len(screen["objects"]))]
    )
    objects.to_csv(screen["object_table"], index=False)
    options = dict(
        image_table=screen["image_table"],
        image_root=screen["image_root"],
        perturbation_column="Metadata_Gene",
        batch_columns=["Metadata_Plate", "Metadata_Well"],
        crop_size=CROP,
    )
    result = ingest(
        screen["object_table"],
        out=tmp_path / "ids.zarr",
        cell_id_column="Metadata_CellID",
        channels=["DNA"],
        **options,
    )
    obs = open_store(result.store_path).obs
    assert list(obs[schema.CELL_ID]) == list(obs["Metadata_CellID"])
    assert set(obs[schema.CELL_ID]) <= set(objects["Metadata_CellID"])

    without_images = {k: v for k, v in options.items() if k != "image_table"}
    with pytest.raises(InputError, match="object table: pass its per-image table"):
        ingest(screen["object_table"], out=tmp_path / "no.zarr", **without_images)
    with pytest.raises(InputError, match="--channels names \\['ER'\\]"):
        ingest(screen["object_table"], out=tmp_path / "er.zarr", channels=["ER"], **options)
    with pytest.raises(InputError, match="no column 'Metadata_Cell'"):
        ingest(
            screen["object_table"], out=tmp_path / "x.zarr", cell_id_column="Metadata_Cell",
            **options,
        )  # fmt: skip
    # two runs' image tables concatenated: ImageNumber repeats
    images = pd.concat([screen["images"], screen["images"]])
    images.to_csv(screen["image_table"], index=False)
    with pytest.raises(DataError, match="repeats ImageNumber"):
        ingest(screen["object_table"], out=tmp_path / "rep.zarr", **options)


# ---------------------------------------------------------------------------
# OME-Zarr and OME-TIFF fields
# ---------------------------------------------------------------------------


def _fields_table(root: Path, paths: list[str], seed: int = 0, n_per_field: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for index, path in enumerate(paths):
        for k in range(n_per_field):
            rows.append(
                {
                    "cell_id": f"f{index}_{k}",
                    "gene": ["ACTB", "TUBB"][k % 2],
                    "plate": "P1",
                    "well": f"W{index}",
                    "field_path": path,
                    "x": rng.uniform(CROP, FIELD[1] - CROP),
                    "y": rng.uniform(CROP, FIELD[0] - CROP),
                }
            )
    table = root / "cells.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def omero_channel(label: str) -> dict:
    """An ``omero`` channel as the NGFF transitional metadata requires it."""
    window = {"start": 0, "end": 65535, "min": 0, "max": 65535}
    return {"label": label, "color": "FFFFFF", "window": window, "active": True}


# ome-zarr-py 0.18's writer module builds a deprecated Scaler when it is imported; not ours
@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")
@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_fields_written_by_ome_zarr_py(tmp_path: Path, version: str) -> None:
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(1)
    fields, paths = [], []
    for index in range(2):
        field = rng.integers(0, 60000, (3, *FIELD), dtype=np.uint16)
        name = f"fields/field{index}.ome.zarr"
        fmt = FormatV04() if version == "0.4" else FormatV05()
        group = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=fmt.zarr_format)
        write_image(
            field, group, axes="cyx", fmt=fmt,
            omero={"channels": [omero_channel(c) for c in CHANNELS]},
        )  # fmt: skip
        fields.append(field)
        paths.append(name)
    table = _fields_table(tmp_path, paths)
    result = ingest(
        table, out=tmp_path / "store.zarr", perturbation_column="gene",
        fov_column="field_path", x_column="x", y_column="y", crop_size=CROP,
    )  # fmt: skip
    store = open_store(result.store_path)
    assert store.channel_names == list(CHANNELS)  # the omero labels
    images = store.read(np.arange(store.n_cells))
    for position, cell in enumerate(store.obs.itertuples()):
        field = fields[int(cell.cell_id[1])]
        np.testing.assert_array_equal(images[position], crop_of(field, cell.x, cell.y))


def test_ome_tiff_fields_take_their_channel_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    fields, paths = [], []
    (tmp_path / "fields").mkdir()
    for index in range(2):
        field = rng.integers(0, 60000, (3, *FIELD), dtype=np.uint16)
        name = f"fields/field{index}.ome.tif"
        tifffile.imwrite(
            tmp_path / name, field, ome=True,
            metadata={"axes": "CYX", "Channel": {"Name": list(CHANNELS)}},
        )  # fmt: skip
        fields.append(field)
        paths.append(name)
    table = _fields_table(tmp_path, paths)
    result = ingest(
        table, out=tmp_path / "store.zarr", perturbation_column="gene",
        fov_column="field_path", x_column="x", y_column="y", crop_size=CROP,
    )  # fmt: skip
    store = open_store(result.store_path)
    assert store.channel_names == list(CHANNELS)
    cell = store.obs.iloc[0]
    np.testing.assert_array_equal(
        store.read([0])[0], crop_of(fields[int(cell["cell_id"][1])], cell["x"], cell["y"])
    )


def test_ome_zarr_that_is_no_image_is_a_bad_row_not_a_missing_file(tmp_path: Path) -> None:
    import zarr

    zarr.open_group(str(tmp_path / "plate.ome.zarr"), mode="w").attrs["ome"] = {
        "version": "0.5",
        "plate": {"wells": []},
    }
    table = _fields_table(tmp_path, ["plate.ome.zarr"])
    with pytest.raises(DataError, match="plate/well or a labels group") as error:
        ingest(
            table, out=tmp_path / "store.zarr", perturbation_column="gene",
            fov_column="field_path", x_column="x", y_column="y", crop_size=CROP,
        )  # fmt: skip
    assert "file not found" not in str(error.value)


# ---------------------------------------------------------------------------
# label images
# ---------------------------------------------------------------------------


def _masked_screen(root: Path) -> dict:
    """One 2-channel field and its label image: disks 1-4, disk 2 close enough to disk 1 to
    reach into its crop, disk 4 at the border, and a row whose label 9 is not drawn.
    """
    from skimage.draw import disk

    rng = np.random.default_rng(3)
    field = rng.integers(1, 60000, (2, *FIELD), dtype=np.uint16)  # no zero pixels
    labels = np.zeros(FIELD, np.uint16)
    centres = {1: (12, 12), 2: (12, 17), 3: (28, 34), 4: (2, 40)}
    for label, centre in centres.items():
        labels[disk(centre, 3, shape=FIELD)] = label
    tifffile.imwrite(root / "field.tif", field, photometric="minisblack")
    tifffile.imwrite(root / "field_labels.tif", labels)
    table = root / "objects.csv"
    pd.DataFrame(
        {
            "ObjectNumber": [1, 2, 3, 4, 9],
            "gene": ["ACTB", "TUBB", "ACTB", "TUBB", "ACTB"],
            "plate": "P1",
            "well": "A01",
            "field": "field.tif",
            "mask": "field_labels.tif",
        }
    ).to_csv(table, index=False)
    return {"table": table, "field": field, "labels": labels, "centres": centres}


@pytest.mark.parametrize("neighbours", ["zero", "keep"])
def test_masks_crop_each_object_and_blank_its_neighbours(tmp_path: Path, neighbours) -> None:
    screen = _masked_screen(tmp_path)
    result = ingest(
        screen["table"], out=tmp_path / "store.zarr", perturbation_column="gene",
        fov_column="field", mask_column="mask", mask_neighbours=neighbours,
        crop_size=CROP, skip_bad=True, workers=2 if neighbours == "zero" else 1,
    )  # fmt: skip
    store = open_store(result.store_path)
    assert store.attributes[schema.MASK_NEIGHBOURS] == neighbours
    assert result.n_border == 1  # disk 4 at the top edge
    assert result.n_rejected == 1  # label 9 is not in the mask
    rejected = store.rejected.set_index("row")["reason"]
    assert "label 9 is not in the mask" in rejected[4]
    assert "border" in rejected[3]
    images = store.read(np.arange(store.n_cells))
    assert sorted(store.obs["ObjectNumber"]) == [1, 2, 3]
    for position, label in enumerate(store.obs["ObjectNumber"]):
        centre_y, centre_x = screen["centres"][label]  # a disk's mean pixel is its centre
        expected = crop_of(screen["field"], centre_x, centre_y).copy()
        window = crop_of(screen["labels"], centre_x, centre_y)
        if neighbours == "zero":
            expected[:, (window != 0) & (window != label)] = 0
        np.testing.assert_array_equal(images[position], expected)
    # disk 2 reaches into disk 1's crop: blanked there, or kept
    first = images[list(store.obs["ObjectNumber"]).index(1)]
    assert (first == 0).any() == (neighbours == "zero")


def test_masks_with_centroid_columns_and_bad_options(tmp_path: Path) -> None:
    screen = _masked_screen(tmp_path)
    table = pd.read_csv(screen["table"]).iloc[:3]
    table["x"] = [12.4, 19.0, 34.0]  # crop at the given centroid, not the mask's
    table["y"] = [12.0, 12.0, 28.0]
    table["label"] = table.pop("ObjectNumber")
    table.to_csv(screen["table"], index=False)
    options = dict(
        perturbation_column="gene", fov_column="field", mask_column="mask", crop_size=CROP
    )
    with pytest.raises(InputError, match="--label-column"):
        ingest(screen["table"], out=tmp_path / "a.zarr", **options)
    result = ingest(
        screen["table"], out=tmp_path / "b.zarr", label_column="label", x_column="x",
        y_column="y", **options,
    )  # fmt: skip
    store = open_store(result.store_path)
    for position, cell in enumerate(store.obs.itertuples()):
        expected = crop_of(screen["field"], cell.x, cell.y).copy()
        window = crop_of(screen["labels"], cell.x, cell.y)
        expected[:, (window != 0) & (window != cell.label)] = 0
        np.testing.assert_array_equal(store.read([position])[0], expected)
    with pytest.raises(InputError, match="--mask-neighbours"):
        ingest(screen["table"], out=tmp_path / "c.zarr", mask_neighbours="blank", **options)
    with pytest.raises(InputError, match="--mask-column needs fields of view"):
        ingest(
            screen["table"], out=tmp_path / "d.zarr", perturbation_column="gene",
            image_column="field", mask_column="mask", label_column="label",
        )  # fmt: skip


@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")
def test_ome_zarr_labels_group_as_the_mask(tmp_path: Path) -> None:
    """An OME-Zarr field with its segmentation in ``labels/`` (ome-zarr-py's write_labels)."""
    import zarr
    from ome_zarr.writer import write_image, write_labels
    from skimage.draw import disk

    rng = np.random.default_rng(4)
    field = rng.integers(1, 60000, (2, *FIELD), dtype=np.uint16)
    labels = np.zeros(FIELD, np.uint32)
    centres = {1: (15, 20), 2: (15, 25)}  # 2 reaches into 1's crop
    for label, centre in centres.items():
        labels[disk(centre, 3, shape=FIELD)] = label
    group = zarr.open_group(str(tmp_path / "field.ome.zarr"), mode="w")
    write_image(field, group, axes="cyx")
    write_labels(labels, group, name="cells", axes="yx", scaler=None, scale_factors=(2,))
    table = tmp_path / "objects.csv"
    pd.DataFrame(
        {"ObjectNumber": [1, 2], "gene": ["ACTB", "TUBB"], "plate": "P1", "well": "A01",
         "field": "field.ome.zarr", "mask": "field.ome.zarr/labels/cells"}
    ).to_csv(table, index=False)  # fmt: skip
    result = ingest(
        table, out=tmp_path / "store.zarr", perturbation_column="gene", fov_column="field",
        mask_column="mask", crop_size=CROP, channel_names=["dna", "actin"],
    )  # fmt: skip
    store = open_store(result.store_path)
    assert result.n_cells == 2
    for position, label in enumerate(store.obs["ObjectNumber"]):
        centre_y, centre_x = centres[label]
        expected = crop_of(field, centre_x, centre_y).copy()
        window = crop_of(labels, centre_x, centre_y)
        expected[:, (window != 0) & (window != label)] = 0
        assert (expected == 0).any()
        np.testing.assert_array_equal(store.read([position])[0], expected)


def test_every_command_in_docs_inputs_parses() -> None:
    """docs/inputs.md shows one command per input kind: each names only real options."""
    import shlex

    import typer.main

    text = (Path(__file__).resolve().parents[1] / "docs" / "inputs.md").read_text()
    commands = [
        shlex.split(block.replace("\\\n", " "), comments=True)
        for block in text.split("```bash\n")[1:]
        for block in [block.split("```")[0]]
    ]
    ingest_command = typer.main.get_command(app).commands["ingest"]
    n_parsed = 0
    for block in commands:
        for start in [i for i, word in enumerate(block) if word == "scbd-cells"]:
            end = next((i for i in range(start + 1, len(block)) if block[i] == "scbd-cells"), None)
            ingest_command.make_context("ingest", block[start + 2 : end])  # unknown option: raises
            n_parsed += 1
    assert n_parsed >= 7


@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")
def test_ome_zarr_axes_by_name_and_one_plane_only(tmp_path: Path) -> None:
    """tczyx with t = z = 1 reads as (C, H, W); a z-stack is refused, naming the axis."""
    import zarr
    from ome_zarr.writer import write_image

    from scbd_cells.data.ome_zarr import read_ome_zarr

    pixels = np.arange(2 * 3 * 16 * 20, dtype=np.uint16).reshape(1, 3, 2, 16, 20)  # t c z y x
    write_image(pixels[:, :, :1], zarr.open_group(str(tmp_path / "flat.zarr"), mode="w"),
                axes="tczyx")  # fmt: skip
    np.testing.assert_array_equal(read_ome_zarr(tmp_path / "flat.zarr"), pixels[0, :, 0])
    write_image(pixels, zarr.open_group(str(tmp_path / "stack.zarr"), mode="w"), axes="tczyx")
    with pytest.raises(DataError, match="more than one plane along z"):
        read_ome_zarr(tmp_path / "stack.zarr")
