"""L1000 expression readers, landmark selection and pairing (data_builders/expression.py)."""

import os

import h5py
import numpy as np
import pandas as pd
import pytest

from data_builders import expression as ex

N_GENES, LANDMARKS = 12, [1, 2, 4, 5, 7, 8, 10, 11]
GENE_IDS = [str(1000 + 7 * j) for j in range(N_GENES)]
SYMBOLS = [f"G{j}" for j in range(N_GENES)]
META = pd.DataFrame({
    "id": [f"SIG{i:02d}" for i in range(8)],
    "pert_id": ["BRD-A", "BRD-A", "BRD-A", "BRD-B", "BRD-B", "BRD-C", "DMSO", "BRD-D"],
    "pert_idose": ["10 µM", "10.0 um", "1 uM", "500 nM", "0.5", "10 µM", "-666", "3 µM"],
    "pert_itime": ["24 h", "24", "24 h", "6 h", "6 h", "24 h", "24 h", "24 h"],
    "cell_id": ["A549", "A549", "A549", "MCF7", "MCF7", "A549", "A549", "A549"],
})


@pytest.fixture(scope="module")
def values():
    return np.random.default_rng(0).normal(size=(len(META), N_GENES)).astype(np.float32)


def _gene_meta():
    return pd.DataFrame({"pr_gene_symbol": SYMBOLS,
                         "pr_is_lm": ["1" if j in LANDMARKS else "0" for j in range(N_GENES)]})


def _text(x) -> str:
    return repr(float(x))  # Round-trips float32 exactly.


def write_gct13(path, values):
    gene_meta = _gene_meta()
    n_row_meta, n_col_meta = gene_meta.shape[1], META.shape[1] - 1
    lines = ["#1.3", f"{N_GENES}\t{len(META)}\t{n_row_meta}\t{n_col_meta}",
             "\t".join(["id", *gene_meta.columns, *META["id"]])]
    for field in META.columns[1:]:
        lines.append("\t".join([field, *["-666"] * n_row_meta, *META[field]]))
    for j in range(N_GENES):
        lines.append("\t".join([GENE_IDS[j], *gene_meta.iloc[j], *map(_text, values[:, j])]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_gct12(path, values):
    lines = ["#1.2", f"{N_GENES}\t{len(META)}", "\t".join(["Name", "Description", *META["id"]])]
    for j in range(N_GENES):
        lines.append("\t".join([GENE_IDS[j], SYMBOLS[j], *map(_text, values[:, j])]))
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")


def write_gctx(path, values, *, with_meta=True):
    """cmapPy's layout: matrix stored (n_signatures, n_genes); ids and fields as bytes."""
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.bytes_("GCTX1.0")
        f.create_dataset("/0/DATA/0/matrix", data=values, chunks=(3, 5))
        f.create_dataset("/0/META/ROW/id", data=np.array(GENE_IDS, dtype="S"))
        f.create_dataset("/0/META/COL/id", data=np.array(META["id"], dtype="S"))
        if with_meta:
            f.create_dataset("/0/META/ROW/pr_gene_symbol", data=np.array(SYMBOLS, dtype="S"))
            f.create_dataset("/0/META/ROW/pr_is_lm", data=np.array(
                [int(j in LANDMARKS) for j in range(N_GENES)], dtype=np.int64))
            for field in META.columns[1:]:
                f.create_dataset(f"/0/META/COL/{field}", data=np.array(
                    [v.encode("utf-8") for v in META[field]], dtype="S"))


def write_csv(path, values):
    table = META.rename(columns={"id": "sig_id"}).copy()
    table = pd.concat([table, pd.DataFrame(values, columns=GENE_IDS)], axis=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(table.columns) + "\n")
        for _, row in table.iterrows():
            f.write(",".join(_text(v) if isinstance(v, (float, np.floating)) else v
                             for v in row) + "\n")


def write_npy(tmp_path, values):
    np.save(tmp_path / "sigs.npy", values)
    META.to_csv(tmp_path / "sigs_meta.csv", index=False)
    pd.DataFrame({"pr_gene_id": GENE_IDS, **_gene_meta()}).to_csv(tmp_path / "sigs_genes.tsv",
                                                                sep="\t", index=False)
    return tmp_path / "sigs.npy", tmp_path / "sigs_meta.csv", tmp_path / "sigs_genes.tsv"


def test_every_reader_gives_the_same_signatures(tmp_path, values):
    write_gct13(tmp_path / "a.gct", values)
    write_gctx(tmp_path / "a.gctx", values)
    write_csv(tmp_path / "a.csv", values)
    npy, meta, genes = write_npy(tmp_path, values)
    read = {"gct": ex.read_gct(tmp_path / "a.gct"), "gctx": ex.read_gctx(tmp_path / "a.gctx"),
            "csv": ex.read_table(tmp_path / "a.csv"),
            "npy": ex.read_table(npy, meta=meta, genes=genes)}
    for name, sig in read.items():
        np.testing.assert_array_equal(sig.values, values, err_msg=name)
        assert sig.values.dtype == np.float32
        pd.testing.assert_frame_equal(sig.meta[list(META.columns)], META.replace("-666", ""),
                                      obj=name)  # The CMap null marker reads as "".
        assert sig.genes["id"].tolist() == GENE_IDS, name
    for name in ("gct", "gctx", "npy"):
        assert read[name].genes["symbol"].tolist() == SYMBOLS
        assert np.flatnonzero(read[name].genes["is_landmark"]).tolist() == LANDMARKS
    assert "is_landmark" not in read["csv"].genes.columns
    gct12 = tmp_path / "b.gct"
    write_gct12(gct12, values)
    sig = ex.read_gct(gct12)
    np.testing.assert_array_equal(sig.values, values)
    assert sig.meta["id"].tolist() == META["id"].tolist()
    assert sig.genes["description"].tolist() == SYMBOLS
    assert ex.read_signatures(tmp_path / "a.gctx").values.shape == values.shape


def test_gct13_literal_file(tmp_path):
    """A hand-written GCT 1.3 (layout of cmapPy's parse_gct docstring): genes are file rows."""
    text = ("#1.3\n3\t2\t1\t2\n"
            "id\tpr_gene_symbol\tS1\tS2\n"
            "pert_id\t-666\tBRD-X\tDMSO\n"
            "pert_idose\t-666\t10 µM\t-666\n"
            "100\tAAA\t1.5\t-2\n"
            "200\tBBB\tNaN\t0.25\n"
            "300\t-666\t3e-1\t4\n")
    (tmp_path / "lit.gct").write_text(text, encoding="utf-8")
    sig = ex.read_gct(tmp_path / "lit.gct")
    np.testing.assert_array_equal(sig.values, np.array(
        [[1.5, np.nan, 0.3], [-2, 0.25, 4]], dtype=np.float32))
    assert sig.meta.to_dict("list") == {"id": ["S1", "S2"], "pert_id": ["BRD-X", "DMSO"],
                                        "pert_idose": ["10 µM", ""]}
    assert sig.genes["symbol"].tolist() == ["AAA", "BBB", ""]


@pytest.mark.parametrize("edit, message", [
    (lambda l: ["#1.4"] + l[1:], r":1: expected the GCT version line"),
    (lambda l: l[:1] + ["12 8 2"] + l[2:], r":2: GCT 1.3 needs the dimensions line"),
    (lambda l: l[:2] + [l[2] + "\textra"] + l[3:], r":3: expected 11 tab-separated fields"),
    (lambda l: l[:9] + [l[9].rsplit("\t", 1)[0] + "\t1.x"] + l[10:],
     r":10: value '1.x' \(signature 'SIG07'\) is not a number"),
    (lambda l: l[:-1], r"says 12 genes and 4 column-metadata lines \(19 lines in all\).*18"),
])
def test_gct_malformed_lines_are_named(tmp_path, values, edit, message):
    path = tmp_path / "a.gct"
    write_gct13(path, values)
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        ex.read_gct(path)


@pytest.mark.parametrize("block", [1024, 2])
def test_gctx_selection_reads_the_same_block(tmp_path, values, monkeypatch, block):
    monkeypatch.setattr(ex, "_READ_BLOCK", block)
    path = tmp_path / "a.gctx"
    write_gctx(path, values)
    sig = ex.read_gctx(path, pert_ids=["BRD-A", "BRD-D"], genes=["G11", "1000", "G4"])
    rows = [0, 1, 2, 7]
    np.testing.assert_array_equal(sig.values, values[np.ix_(rows, [11, 0, 4])])
    assert sig.meta["id"].tolist() == META["id"].iloc[rows].tolist()
    assert sig.genes["symbol"].tolist() == ["G11", "G0", "G4"]
    sig = ex.read_gctx(path, signatures=["SIG06", "SIG01"])
    np.testing.assert_array_equal(sig.values, values[[1, 6]])
    with pytest.raises(ValueError, match=r"no signatures with ids \['SIG99'\]"):
        ex.read_gctx(path, signatures=["SIG99"])
    with pytest.raises(ValueError, match=r"1 genes not found by id or symbol: \['NOPE'\]"):
        ex.read_gctx(path, genes=["G1", "NOPE"])


def test_gctx_with_lincs_info_tables(tmp_path, values):
    path = tmp_path / "a.gctx"
    write_gctx(path, values, with_meta=False)
    META.rename(columns={"id": "sig_id"}).to_csv(tmp_path / "sig_info.txt", sep="\t", index=False)
    genes = pd.DataFrame({"pr_gene_id": GENE_IDS[::-1], **_gene_meta().iloc[::-1]})
    genes.to_csv(tmp_path / "gene_info.txt", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"pert_ids= needs a pert_id signature field"):
        ex.read_gctx(path, pert_ids=["BRD-B"])
    sig = ex.read_gctx(path, pert_ids=["BRD-B"], signature_info=tmp_path / "sig_info.txt",
                       gene_info=tmp_path / "gene_info.txt")
    np.testing.assert_array_equal(sig.values, values[[3, 4]])
    assert sig.genes["symbol"].tolist() == SYMBOLS
    assert ex.select_landmarks(sig, n_expected=8).genes["id"].tolist() == [
        GENE_IDS[j] for j in LANDMARKS]
    META.iloc[:5].rename(columns={"id": "sig_id"}).to_csv(tmp_path / "short.txt", sep="\t",
                                                          index=False)
    with pytest.raises(ValueError, match=r"short.txt: no row for 3 signature ids"):
        ex.read_gctx(path, signature_info=tmp_path / "short.txt")


def test_gctx_bad_layout(tmp_path, values):
    path = tmp_path / "t.gctx"
    write_gctx(path, values)
    with h5py.File(path, "a") as f:
        del f["/0/DATA/0/matrix"]
        f.create_dataset("/0/DATA/0/matrix", data=values.T)
    with pytest.raises(ValueError, match=r"has shape \(12, 8\); cmapPy stores it as "
                                         r"\(n_signatures, n_genes\) = \(8, 12\)"):
        ex.read_gctx(path)
    with h5py.File(path, "a") as f:
        del f["/0/META/COL/id"]
    with pytest.raises(ValueError, match=r"not a GCTX file, it has no /0/META/COL/id"):
        ex.read_gctx(path)


def test_read_table_columns_and_errors(tmp_path, values):
    table = META.copy()
    table["pert_dose"] = [10.0, 10.0, 1.0, 0.5, 0.5, 10.0, -666, 3.0]  # Numeric metadata.
    table["replicate"] = [1, 2, 1, 1, 2, 1, 1, 1]
    table = pd.concat([table, pd.DataFrame(values[:, :3], columns=["780_at", "7849_at", "x"])],
                      axis=1)
    table.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    sig = ex.read_table(tmp_path / "t.tsv", meta_columns=["x"])
    assert sig.genes["id"].tolist() == ["780_at", "7849_at"]
    np.testing.assert_allclose(sig.values, values[:, :2], rtol=1e-6)
    assert sig.meta.columns.tolist() == [*META.columns, "pert_dose", "replicate", "x"]
    assert sig.meta["pert_dose"].iloc[6] == ""
    with pytest.raises(ValueError, match=r"column 'pert_id' is not a unique id"):
        ex.read_table(tmp_path / "t.tsv", key="pert_id")
    with pytest.raises(ValueError, match=r"key='' numbers the rows but the table has an 'id'"):
        ex.read_table(tmp_path / "t.tsv", key="")
    table.rename(columns={"id": "sig_id"}).to_csv(tmp_path / "u.csv", index=False)
    numbered = ex.read_table(tmp_path / "u.csv", key="", meta_columns=["x"])
    assert numbered.meta["id"].tolist()[:2] == ["0", "1"]
    assert numbered.meta["sig_id"].tolist() == META["id"].tolist()
    npy, meta, genes = write_npy(tmp_path, values)
    with pytest.raises(ValueError, match=r"needs meta= .* and genes="):
        ex.read_table(npy, meta=meta)
    pd.DataFrame({"id": GENE_IDS[:-1]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"short.csv lists 11 genes but .* has 12 columns"):
        ex.read_table(npy, meta=meta, genes=tmp_path / "short.csv")


def test_select_landmarks(tmp_path, values):
    path = tmp_path / "a.gctx"
    write_gctx(path, values)
    sig = ex.read_gctx(path)
    chosen = ex.select_landmarks(sig, n_expected=8)
    np.testing.assert_array_equal(chosen.values, values[:, LANDMARKS])
    order = ["G10", GENE_IDS[2], "G5"]
    np.testing.assert_array_equal(
        ex.select_landmarks(sig, landmarks=order, n_expected=3).values, values[:, [10, 2, 5]])
    (tmp_path / "lm.txt").write_text("# landmarks\nG10\n\n1014\nG5\n")
    assert ex.select_landmarks(sig, landmarks=tmp_path / "lm.txt", n_expected=None).genes[
        "symbol"].tolist() == ["G10", "G2", "G5"]
    (tmp_path / "lm.csv").write_text("symbol\nG5\nG1\n")
    assert ex.select_landmarks(sig, landmarks=tmp_path / "lm.csv", n_expected=2).genes[
        "id"].tolist() == [GENE_IDS[5], GENE_IDS[1]]
    gene_info = pd.DataFrame({"pr_gene_id": GENE_IDS, **_gene_meta()})
    gene_info.to_csv(tmp_path / "gene_info.txt", sep="\t", index=False)
    from_file = ex.select_landmarks(sig, landmarks=tmp_path / "gene_info.txt", n_expected=8)
    np.testing.assert_array_equal(from_file.values, chosen.values)
    dropped = ex.select_landmarks(sig, drop=["G4"], n_expected=7)
    assert dropped.genes["symbol"].tolist() == [SYMBOLS[j] for j in LANDMARKS if j != 4]
    with pytest.raises(ValueError, match=r"selected 8 landmark genes, expected 978"):
        ex.select_landmarks(sig)
    with pytest.raises(ValueError, match=r"2 genes not found by id or symbol: \['XX', 'YY'\]"):
        ex.select_landmarks(sig, landmarks=["G1", "XX", "YY"], n_expected=None)
    with pytest.raises(ValueError, match=r"genes not found .*\['G0'\]"):
        ex.select_landmarks(sig, drop=["G0"], n_expected=None)
    with pytest.raises(ValueError, match=r"no landmark flags \(pr_is_lm\)"):
        ex.select_landmarks(ex.read_gct(_gct12(tmp_path, values)))


def _gct12(tmp_path, values):
    write_gct12(tmp_path / "b.gct", values)
    return tmp_path / "b.gct"


def test_replicates_average_like_pandas_groupby(values):
    sig = ex.Signatures(values, pd.DataFrame({"id": GENE_IDS}), META.copy(), "mem")
    perts = pd.DataFrame({"perturbation": ["BRD-C", "BRD-A", "BRD-B", "BRD-A"],
                          "is_control": [0, 0, 0, 0]})
    matrix, report = ex.pair_expression(perts, sig)
    expected = pd.DataFrame(values).groupby(META["pert_id"].to_numpy()).mean()
    np.testing.assert_allclose(matrix, expected.loc[perts["perturbation"]].to_numpy(),
                               rtol=1e-6, atol=1e-7)
    assert matrix.dtype == np.float32
    assert report["n_signatures"] == [1, 3, 2, 3]
    assert report["signature_ids"][2] == ["SIG03", "SIG04"]
    median, _ = ex.pair_expression(perts, sig, aggregate="median")
    np.testing.assert_allclose(median[1], np.median(values[:3], axis=0), rtol=1e-6)


def test_dose_time_and_cell_matching(values):
    sig = ex.Signatures(values, pd.DataFrame({"id": GENE_IDS}), META.copy(), "mem")
    perts = pd.DataFrame({"perturbation": ["BRD-A", "BRD-A", "BRD-B"],
                          "dose_um": [10.0, 1.0, 0.5], "hours": ["24 h", "24", "6"],
                          "cell": ["a549", "A549", "MCF7"]})
    matrix, report = ex.pair_expression(perts, sig, dose=("dose_um", "pert_idose"),
                                        time=("hours", "pert_itime"), cell=("cell", "cell_id"))
    assert report["signature_ids"] == [["SIG00", "SIG01"], ["SIG02"], ["SIG03", "SIG04"]]
    np.testing.assert_allclose(matrix[0], values[:2].mean(0), rtol=1e-6)
    perts.loc[2, "hours"] = "24 h"
    with pytest.raises(ValueError, match=r"for 1 of 3 perturbation rows .*BRD-B dose=0.5 "
                                         r"time=24.0 cell=mcf7 \(signatures exist at"):
        ex.pair_expression(perts, sig, dose=("dose_um", "pert_idose"),
                           time=("hours", "pert_itime"), cell=("cell", "cell_id"))


@pytest.mark.parametrize("text, micromolar", [
    ("10 uM", 10.0), ("10.0", 10.0), ("10 µM", 10.0), ("10 μM", 10.0), ("10.0 um", 10.0),
    ("10000 nM", 10.0), ("0.5 mM", 500.0), (3.33, 3.33), ("-666", None), (float("nan"), None)])
def test_parse_dose(text, micromolar):
    assert ex.parse_dose(text) == micromolar


def test_parse_time_and_bad_units():
    assert [ex.parse_time(t) for t in ("24 h", "24", "6 hr", "30 min", "2 d", 48)] == [
        24.0, 24.0, 6.0, 0.5, 48.0, 48.0]
    with pytest.raises(ValueError, match=r"cannot read dose '10 kg'"):
        ex.parse_dose("10 kg")


def test_missing_perturbations_are_listed(values):
    sig = ex.Signatures(values, pd.DataFrame({"id": GENE_IDS}), META.copy(), "lincs.gctx")
    names = [f"BRD-Z{i:02d}" for i in range(25)]
    perts = pd.DataFrame({"perturbation": ["BRD-A", *names], "is_control": 0})
    with pytest.raises(ValueError, match=r"lincs.gctx for 25 of 26 perturbation rows .*BRD-Z00;"
                                         r".*BRD-Z19; \.\.\. and 5 more") as info:
        ex.pair_expression(perts, sig)
    assert "BRD-Z20" not in str(info.value)
    with pytest.raises(ValueError, match=r"no signature field 'pert_iname'"):
        ex.pair_expression(perts, sig, key="pert_iname")


def test_control_policies(values):
    sig = ex.Signatures(values, pd.DataFrame({"id": GENE_IDS}), META.copy(), "mem")
    perts = pd.DataFrame({"perturbation": ["BRD-A", "DMSO", "EMPTY"], "is_control": [0, 1, 1]})
    with pytest.raises(ValueError, match=r"for 1 of 3 .*EMPTY"):
        ex.pair_expression(perts, sig)
    zeros, report = ex.pair_expression(perts, sig, controls="zeros")
    assert not zeros[1:].any() and zeros[0].any() and report["control_rows_filled"] == [1, 2]
    mean, report = ex.pair_expression(perts, sig, controls="mean_of_controls")
    np.testing.assert_array_equal(mean[2], values[6])
    np.testing.assert_array_equal(mean[1], values[6])
    assert report["control_rows_filled"] == [2]
    with pytest.raises(ValueError, match=r"for 1 of 2 .*BRD-Q"):
        ex.pair_expression(pd.DataFrame({"perturbation": ["BRD-Q", "DMSO"],
                                         "is_control": [0, 1]}), sig, controls="zeros")


def test_write_expression_round_trip(tmp_path, values):
    raw = tmp_path / "raw"
    raw.mkdir()
    perts = pd.DataFrame({"perturbation": ["BRD-B", "BRD-A", "DMSO"], "type": "compound",
                          "is_control": [0, 0, 1]})
    perts.to_csv(raw / "perturbations.csv", index=False)
    path = tmp_path / "a.gctx"
    write_gctx(path, values)
    sig = ex.select_landmarks(ex.read_gctx(path, pert_ids=perts["perturbation"]), n_expected=8)
    matrix, _ = ex.pair_expression(perts, sig, controls="zeros")
    paths = ex.write_expression(raw, matrix, sig.genes)
    assert sorted(os.listdir(raw)) == ["expression.npy", "expression_genes.csv",
                                       "perturbations.csv"]
    back = ex.read_table(paths["expression"], meta=raw / "perturbations.csv",
                         genes=paths["genes"])
    np.testing.assert_array_equal(back.values, matrix)
    assert back.meta["id"].tolist() == ["BRD-B", "BRD-A", "DMSO"]
    assert back.genes["symbol"].tolist() == [SYMBOLS[j] for j in LANDMARKS]
    with pytest.raises(ValueError, match=r"shape \(2, 8\); .*perturbations.csv has 3 rows"):
        ex.write_expression(raw, matrix[:2], sig.genes)
    with pytest.raises(FileNotFoundError, match=r"has no perturbations.csv"):
        ex.write_expression(tmp_path, matrix, sig.genes)
