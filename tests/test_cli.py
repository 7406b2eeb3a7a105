"""The command line: DIALS-style flags, PHIL files, and the example PHIL files."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, process, run_cmd, tool

PHIL = os.path.join(ROOT, "phil")


def test_help():
    result = run_cmd([tool("dials.process_gapped"), "-h"])
    assert result.returncode == 0
    for text in ("usage: dials.process_gapped", "exclude_images", "-c", "-e", "-a", "-v"):
        assert text in result.stdout


@pytest.mark.parametrize("command", ["dials.process_gapped", "dials.simulate_sweep"])
def test_version(tmp_path, command):
    """--version prints DIALS' version and ours and exits 0, writing nothing
    (not even a failed-run log in the working folder)."""
    from dials_gapfill import __version__

    result = run_cmd([tool(command), "--version"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"dials-gapfill {__version__}"
    assert result.stdout.startswith("DIALS ")
    assert os.listdir(tmp_path) == []


def test_show_config_levels():
    base = run_cmd([tool("dials.process_gapped"), "-c"])
    expert = run_cmd([tool("dials.process_gapped"), "-c", "-e", "2"])
    attrs = run_cmd([tool("dials.process_gapped"), "-c", "-a", "1"])
    for r in (base, expert, attrs):
        assert r.returncode == 0
    for scope in ("input {", "gaps {", "spotfinder {", "indexing {", "refinement {", "integration {",
                  "mtz {", "scaling {", "output {", "mp {"):
        assert scope in base.stdout, scope
    # expert level 2 adds dials.import's geometry scope; attributes level 1 adds the help
    assert "geometry {" not in base.stdout and "geometry {" in expert.stdout
    assert ".help" not in base.stdout and ".help" in attrs.stdout
    assert "Find bad images and make them gaps" in attrs.stdout


def test_every_own_parameter_has_help():
    from dials_gapfill.phil import master_phil

    own = ("input.", "gaps.", "scaling.", "output.", "mp.", "refinement.blocks.",
           "indexing.blocks.", "integration.small_blocks.", "mtz.intensity")
    for d in master_phil().all_definitions():
        if d.path.startswith(own) and not d.path.startswith("input.tolerance"):
            assert d.object.help, d.path


def test_short_forms_and_phil_files_combine(tmp_path):
    from dials_gapfill.phil import params_from

    p = params_from(["nproc=3", "space_group=P4", "exclude_images=4:5", "scale=True"])
    assert (p.mp.nproc, str(p.indexing.known_symmetry.space_group), p.scaling.run) == (3, "P 4", True)
    assert p.gaps.exclude_images == [["4:5"]]
    f = tmp_path / "a.phil"
    f.write_text("refinement.blocks.tie_cells = False\n")
    # a PHIL file, key=value and image arguments mixed, as DIALS programs take them
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.phil import master_phil

    params, options, images, diff = parse([str(f), "nproc=3", "/data/x_*.cbf", "-v"], master_phil())
    assert params.refinement.blocks.tie_cells is False and params.mp.nproc == 3
    assert images == ["/data/x_*.cbf"] and options.verbose == 1
    assert "tie_cells = False" in diff and "nproc = 3" in diff


def test_a_typed_auto_is_the_default(tmp_path):
    """PHIL extracts a typed `auto` as libtbx's Auto but the default as the
    word; the code compares words, so every one of this project's choices
    that offers auto must read the same either way, on every way in."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.phil import AUTO_CHOICES, master_phil, params_from

    def value(params, path):
        for name in path.split("."):
            params = getattr(params, name)
        return params

    own = [d.path for d in master_phil().all_definitions()
           if d.object.type.phil_type == "choice" and d.path.startswith(("scaling.", "output.", "integration.p"))
           and "*auto" in [w.value for w in d.object.words]]
    assert sorted(own) == sorted(AUTO_CHOICES)
    typed = [f"{path}=auto" for path in AUTO_CHOICES]
    f = tmp_path / "auto.phil"
    f.write_text("\n".join(t.replace("=", " = ") for t in typed) + "\n")
    for params in (params_from(typed), params_from("\n".join(typed)), parse(typed, master_phil())[0],
                   parse([str(f)], master_phil())[0]):
        assert [value(params, p) for p in AUTO_CHOICES] == ["auto"] * len(AUTO_CHOICES)


def _summary(out):
    return json.load(open(os.path.join(out, "dials.process_gapped.json")))


@pytest.mark.slow
def test_known_symmetry_phil(tiny, tmp_path, truth_tiny):
    out = str(tmp_path / "out")
    result = process(tiny, out, os.path.join(PHIL, "known_symmetry.phil"))
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    from dials_gapfill.simulation.compare import load

    experiments, _ = load(out)
    for e in experiments:
        assert str(e.crystal.get_space_group().info()) == "P 21 21 21"
        for v, t in zip(e.crystal.get_unit_cell().parameters(), truth_tiny["unit_cell"]):
            assert v == pytest.approx(t, rel=0.002)
    summary = _summary(out)
    assert summary["scaling"]["symmetry"]["space_group"] == "P 21 21 21"
    assert summary["scaling"]["cc_half"][0] > 0.95
    # merged as dials.merge merges by default: the Friedel mates apart too
    import iotbx.mtz

    labels = iotbx.mtz.object(os.path.join(out, "merged.mtz")).column_labels()
    assert {"IMEAN", "F", "I(+)", "I(-)", "F(+)", "F(-)", "DANO"} <= set(labels), labels
    # the terminal shows this program's messages, the log all of DIALS'
    log = open(os.path.join(out, "dials.process_gapped.log")).read()
    assert "Configuring spot finder" in log and "Configuring spot finder" not in result.stdout
    assert "The following parameters have been modified" in log and "P212121" in log


@pytest.mark.slow
def test_exclude_bad_images_phil(tiny, tmp_path):
    """The example file (its exclusions are left for the user to fill in, so it
    runs on any sweep), exclusions on the command line with it, and the
    Bravais lattice chosen after P1 indexing."""
    import iotbx.phil

    from dials_gapfill.phil import master_phil

    example = master_phil().fetch(source=iotbx.phil.parse(file_name=os.path.join(PHIL, "exclude_bad_images.phil")))
    assert example.extract().gaps.exclude_images == []  # nothing that needs a long sweep
    out = str(tmp_path / "out")
    result = process(tiny, out, os.path.join(PHIL, "exclude_bad_images.phil"), "exclude_images=21:23,35",
                     "indexing.bravais_lattice=auto")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    summary = _summary(out)
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == [(1, 20), (24, 34), (36, 40)]
    assert {e["image"] for e in summary["excluded_images"] if e["by"] == "user"} == {21, 22, 23, 35}
    # orthorhombic primitive, the lowest-symmetry space group of oP
    assert summary["crystal"]["bravais_lattice"].startswith("oP")
    assert summary["crystal"]["final"]["space_group"] == "P 2 2 2"
    cell = summary["crystal"]["final"]["unit_cell"]
    assert cell[3:] == pytest.approx([90, 90, 90], abs=1e-6)


@pytest.mark.slow
def test_high_mosaicity_phil(tiny, tmp_path):
    gemmi = pytest.importorskip("gemmi", reason="gemmi is a test requirement")
    out = str(tmp_path / "out")
    result = process(tiny, out, os.path.join(PHIL, "high_mosaicity.phil"))
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    summary = _summary(out)
    assert all(b["profile_fitted"] == 0 and b["integrated"] > 1000 for b in summary["blocks"])
    labels = gemmi.read_mtz_file(os.path.join(out, "integrated.mtz")).column_labels()
    assert "I" in labels and "IPR" not in labels


@pytest.mark.slow
def test_fast_preview_phil_with_verbose(tiny, tmp_path):
    out = str(tmp_path / "out")
    result = process(tiny, out, os.path.join(PHIL, "fast_preview.phil"), "-v")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    summary = _summary(out)
    assert all(b["refinement"].endswith("static") for b in summary["blocks"])
    assert all("rmsd_scan_varying" not in b for b in summary["blocks"])
    files = sorted(os.listdir(out))
    assert "dials.process_gapped.html" not in files
    assert not [f for f in files if f.startswith("integrated_")]
    assert "integrated.mtz" in files
    # -v: DIALS' own messages on the terminal too
    assert "Configuring spot finder" in result.stdout
    # the log is among the files written, under its final name; no lock or
    # temporary file is left
    assert "  dials.process_gapped.log  (log)" in result.stdout
    assert {"name": "dials.process_gapped.log", "kind": "log"} in summary["files"]
    assert "dials.process_gapped.log" in files and "dials.process_gapped.failed.log" not in files
    assert not [f for f in files if f.startswith(".")], files


def test_value_ending_in_phil_is_a_value_not_a_file(tmp_path):
    """output.directory=x.phil names a folder; only a plain argument is a PHIL file."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.phil import master_phil

    params, _, images, _ = parse(["output.directory=x.phil", "/data/x_*.cbf"], master_phil())
    assert params.output.directory == "x.phil" and images == ["/data/x_*.cbf"]
    # the command: the folder x.phil is made and the (missing) images are the problem
    out = tmp_path / "x.phil"
    result = run_cmd([tool("dials.process_gapped"), str(tmp_path / "none_*.cbf"), f"output.directory={out}"])
    assert result.returncode == 1
    assert "no files match" in result.stderr and "parameter file" not in result.stderr, result.stderr
    assert out.is_dir()


def test_braces_in_a_value_need_no_quotes():
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.phil import master_phil

    params, _, _, _ = parse(["output.block_mtz=run2_{block}.mtz", "/data/x.cbf"], master_phil())
    assert params.output.block_mtz == "run2_{block}.mtz"


def test_phil_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "settings.phil"
    bad.write_text("scaling {\n  run = True\n  anomalous = True\n}}\n")
    result = run_cmd([tool("dials.process_gapped"), str(bad), "/data/x_*.cbf"])
    assert result.returncode == 1
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"syntax error in the parameter file {bad} line 4" in err, err


def test_validate_accepts_the_defaults_and_the_example_files():
    """Every shipped default and example parameter file passes validation."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.phil import master_phil
    from dials_gapfill.validate import validate

    for name in [None] + sorted(os.listdir(PHIL)):
        args = [os.path.join(PHIL, name)] if name else []
        params, _, _, _ = parse(args + ["/data/x_*.cbf"], master_phil())
        validate(params)


@pytest.mark.parametrize("arg,said", [
    ("space_group=P999", ["'indexing.known_symmetry.space_group=P999'", "Space group symbol not recognized: P999",
                          "check the value"]),
    ("nproc=two", ["'mp.nproc=two'", "check the value"]),
    ("scale=maybe", ["'scaling.run=maybe'", "True or False", "check the value"]),
    ("unit_cell=5,5", ["'unit_cell=5,5'", "six cell parameters"]),
    ("unit_cell=abc", ["'unit_cell=abc'", "six cell parameters"]),
    # PHIL cannot read the value at all unquoted (';' leaves '2' as a
    # parameter of its own): the quoting that keeps it, for text; for a
    # number PHIL's own error, as quoting would not help
    ("output.directory=run;2", ["output.directory: PHIL cannot read 'run;2' unquoted",
                                "quote it for PHIL, output.directory=\"run;2\""]),
    ("mtz.crystal_name=a;b", ["mtz.crystal_name: PHIL cannot read 'a;b' unquoted"]),
    ("nproc=2;3", ["cannot use 'mp.nproc=2;3'"]),
])
def test_a_value_that_cannot_be_read_names_its_parameter(arg, said):
    """One line naming the argument: cctbx fills a short cell in (5,5 is 5,
    5, 1, 90, 90, 90) and its own errors name no parameter."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil

    with pytest.raises(GapfillError) as info:
        parse([arg, "/data/x_*.cbf"], master_phil())
    message = str(info.value)
    assert "\n" not in message and "cctbx Error" not in message
    for text in said:
        assert text in message, (text, message)


@pytest.mark.parametrize("arg", ["space_group=P999", "nproc=two", "scale=maybe"])
def test_the_api_names_a_value_that_cannot_be_read_as_the_command_line_does(arg):
    """params_from (a list, a dict, one line of text) gives the command
    line's one-line message naming the argument; PHIL text over several
    lines names its line (it said "bad parameter value: cctbx Error: ...")."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil, params_from

    with pytest.raises(GapfillError) as info:
        parse([arg, "/data/x_*.cbf"], master_phil())
    key, value = arg.split("=")
    for given in ([arg], {key: value}, arg):
        with pytest.raises(GapfillError) as api:
            params_from(given)
        assert str(api.value) == str(info.value), given
    full = str(info.value).split("'")[1]  # (the full name: short forms are for the command line)
    with pytest.raises(GapfillError) as text:
        params_from(f"mtz.d_min = 2\n{full}\n")
    assert str(text.value).startswith("in the PHIL text line 2: cannot use "), str(text.value)
    assert str(text.value).endswith(": check the value") and "cctbx Error" not in str(text.value)


def test_the_api_gives_the_quoting_that_keeps_a_value_as_the_command_line_does():
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil, params_from

    with pytest.raises(GapfillError) as info:
        parse(["output.directory=run;2", "/data/x_*.cbf"], master_phil())
    with pytest.raises(GapfillError) as api:
        params_from(["output.directory=run;2"])
    assert str(api.value) == str(info.value) and "quote it for PHIL" in str(api.value)


def test_a_short_form_in_a_parameter_file_names_the_full_name(tmp_path):
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil

    f = tmp_path / "short.phil"
    f.write_text("scale = True\n")
    with pytest.raises(GapfillError, match=r"line 1: unknown parameter 'scale'; in a parameter file write its full "
                                           r"name, scaling.run"):
        parse([str(f), "/data/x_*.cbf"], master_phil())


def test_an_empty_parameter_file_sets_nothing(tmp_path):
    """A 0-byte file (one made with touch, to be filled in later), as DIALS
    takes it: not an error, not an image."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.phil import master_phil

    f = tmp_path / "empty.phil"
    f.write_bytes(b"")
    params, _, images, _ = parse([str(f), "nproc=3", "/data/x_*.cbf"], master_phil())
    assert images == ["/data/x_*.cbf"] and params.mp.nproc == 3


def test_a_byte_order_mark_at_the_start_of_a_parameter_file_is_left_out(tmp_path):
    """Windows editors write the UTF-8 byte-order mark first; PHIL would read
    it as part of the first name ("improper definition name" with an
    invisible character).  The file reads as without it, in its place among
    the arguments, and an error further on still names the file and line."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil

    f = tmp_path / "windows.phil"
    f.write_bytes(b"\xef\xbb\xbfscaling.run = True\r\nmp.nproc = 3\r\n")
    params, _, images, _ = parse([str(f), "/data/x_*.cbf"], master_phil())
    assert params.scaling.run is True and params.mp.nproc == 3 and images == ["/data/x_*.cbf"]
    params, _, _, _ = parse(["nproc=2", str(f), "/data/x_*.cbf"], master_phil())
    assert params.mp.nproc == 3  # (the later argument wins, as without the mark)
    params, _, _, _ = parse([str(f), "nproc=2", "/data/x_*.cbf"], master_phil())
    assert params.mp.nproc == 2
    f.write_bytes(b"\xef\xbb\xbfscaling.run = True\ngaps.exclud = 4\n")
    with pytest.raises(GapfillError, match=rf"^in the parameter file {f} line 2: unknown parameter 'gaps.exclud'"):
        parse([str(f), "/data/x_*.cbf"], master_phil())


@pytest.mark.parametrize("content,line", [
    (b"scaling.run = True\nmtz.crystal_name = caf\xe9\n", 2),  # (Latin-1)
    (b"\xef\xbb\xbfmtz {\n  project_name = x\n  crystal_name = caf\xe9\n}\n", 3),  # (a mark, then Latin-1)
])
def test_a_parameter_file_that_is_not_utf8_is_refused_with_its_line(tmp_path, content, line):
    """PHIL drops a byte that is not UTF-8 without a word (crystal_name =
    caf\\xe9 is read as caf): the file is refused, its line named."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil

    f = tmp_path / "latin1.phil"
    f.write_bytes(content)
    with pytest.raises(GapfillError) as info:
        parse([str(f), "/data/x_*.cbf"], master_phil())
    assert str(info.value) == (f"the parameter file {f} line {line} is not valid UTF-8 (byte 0xe9): "
                               "save the file as UTF-8")
    f.write_bytes(content.replace(b"\xe9", "\u00e9".encode()))  # (the same file in UTF-8 is read)
    params, _, _, _ = parse([str(f), "/data/x_*.cbf"], master_phil())
    assert params.mtz.crystal_name == "caf\u00e9"


@pytest.mark.parametrize("how", ["command line", "api text", "api dict"])
def test_a_text_value_that_is_not_utf8_is_refused_before_any_work(how):
    """A value in another encoding (the shell passes Latin-1 bytes as they
    are) would break the log at its first line and the MTZ export at the end
    of the run: refused by validation, naming the parameter."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil, params_from
    from dials_gapfill.validate import validate

    value = "caf\udce9"  # (how Python reads the byte 0xe9 of an argument)
    if how == "command line":
        params, _, images, _ = parse([f"mtz.crystal_name={value}", "/data/x_*.cbf"], master_phil())
    elif how == "api text":
        params, images = params_from(f"mtz.crystal_name={value}"), []
    else:
        params, images = params_from({"mtz.crystal_name": value}), []
    with pytest.raises(GapfillError) as info:
        validate(params, images)
    assert str(info.value) == ("mtz.crystal_name: 'caf\\xe9' is not valid UTF-8 (the log and the MTZ file cannot "
                               "hold it): give it in UTF-8")
    validate(params_from({"mtz.crystal_name": "caf\u00e9"}))  # (UTF-8 é is a name like any other)


def test_a_value_in_a_parameter_file_that_cannot_be_read_names_the_file_line_and_parameter(tmp_path):
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil

    f = tmp_path / "symmetry.phil"
    f.write_text("scaling.run = True\nindexing {\n  known_symmetry.space_group = P9\n}\n")
    with pytest.raises(GapfillError) as info:
        parse([str(f), "/data/x_*.cbf"], master_phil())
    assert str(info.value) == (f"in the parameter file {f} line 3: cannot use indexing.known_symmetry.space_group = P9: "
                               "Space group symbol not recognized: P9: check the value")


@pytest.mark.parametrize("how", ["parameter file", "api text", "api words"])
def test_a_short_cell_is_refused_from_a_file_and_from_the_api(tmp_path, how):
    """unit_cell with fewer than six numbers is refused wherever it is given:
    a parameter file and the API's PHIL text or words as the command line."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil, params_from

    text = "indexing {\n  known_symmetry {\n    unit_cell = 5.4 8.1\n  }\n}\n"
    with pytest.raises(GapfillError) as info:
        if how == "parameter file":
            f = tmp_path / "cell.phil"
            f.write_text(text)
            parse([str(f), "/data/x_*.cbf"], master_phil())
        elif how == "api text":
            params_from(text)
        else:
            params_from(["unit_cell=5.4,8.1"])
    message = str(info.value)
    assert "indexing.known_symmetry.unit_cell=5.4" in message and "six cell parameters" in message, message
    if how == "parameter file":
        assert "cell.phil" in message, message
    # six numbers, and None, pass
    assert params_from(text.replace("5.4 8.1", "5.4 8.1 12.0 90 90 90")).indexing.known_symmetry.unit_cell is not None
    assert params_from(["unit_cell=None"]).indexing.known_symmetry.unit_cell is None


@pytest.mark.slow
def test_a_run_without_json_or_report_leaves_one_runs_results(tiny, tmp_path):
    """output.json=None output.html=None (the preview example file) into a
    folder of earlier runs: the files their JSON summaries listed and this
    run does not write go (their JSON and report, block MTZs of another name,
    the files of a run that named its summary run1.json), a file none listed
    stays (merged.mtz as dials.merge writes it, a JSON that is not a
    summary)."""
    import json

    out = tmp_path / "out"
    out.mkdir()
    listed = ["dials.process_gapped.json", "dials.process_gapped.html", "b_1.mtz", "b_2.mtz", "scaled.mtz"]
    # an earlier run that named its summary itself lists other files
    named = ["run1.log", "scaled.hkl", "scaled.ins"]
    for name in listed + named + ["merged.mtz"]:
        (out / name).write_text("an earlier run's\n")
    for summary, files in (("dials.process_gapped.json", listed), ("run1.json", named)):
        (out / summary).write_text(json.dumps({"program": "dials.process_gapped",
                                               "files": [{"name": n} for n in files]}))
    (out / "notes.json").write_text(json.dumps({"files": [{"name": "merged.mtz"}]}))  # (not a summary: stays)
    result = process(tiny, str(out), os.path.join(PHIL, "fast_preview.phil"), "output.json=None",
                     "output.html=None")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["dials.process_gapped.log", "integrated.expt", "integrated.mtz", "integrated.refl",
                     "merged.mtz", "notes.json"], files
    assert (out / "merged.mtz").read_text() == "an earlier run's\n"


def test_a_path_that_phil_would_read_otherwise_is_refused_with_the_quoting_that_keeps_it():
    """PHIL ends a value at ';', starts a comment at '#' and runs blanks
    together: output.directory="out [2] &;#" (the shell's quotes) wrote to
    'out [2] &'; images=dbl  sp read 'dbl sp'.  Refused, naming what PHIL
    reads; quoted for PHIL the value is kept.  Blanks in a list of ranges
    do not matter."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil, params_from

    with pytest.raises(GapfillError) as info:
        parse(["output.directory=out [2] &;#", "/data/x_*.cbf"], master_phil())
    assert str(info.value) == (
        "output.directory: PHIL reads 'out [2] &;#' as 'out [2] &' (';' ends a value, '#' starts a comment, "
        "blanks run together): quote it for PHIL, output.directory=\"out [2] &;#\" (in single quotes on the "
        "command line)")
    with pytest.raises(GapfillError, match=r"^input.images: PHIL reads 'dbl  sp' as 'dbl sp'"):
        parse(["images=dbl  sp"], master_phil())
    with pytest.raises(GapfillError, match=r"^input.images: PHIL reads 'dbl  sp' as 'dbl sp'"):
        params_from(["images=dbl  sp"])
    params, _, images, _ = parse(['output.directory="out [2] &;#  x"', "/data/x_*.cbf"], master_phil())
    assert params.output.directory == "out [2] &;#  x" and images == ["/data/x_*.cbf"]
    params, _, _, _ = parse(["exclude_images=1:3,  5", "/data/x_*.cbf"], master_phil())
    assert params.gaps.exclude_images == [["1:3,", "5"]]


@pytest.mark.parametrize("arg,said", [
    ("geometry.scan.oscillation=0,-0.4", "geometry.scan.oscillation=0,-0.4: the width is negative: give it as positive "
                                         "(geometry.scan.oscillation=0,0.4) and turn the rotation the other way with "
                                         "geometry.goniometer.invert_rotation_axis=True"),
    ("geometry.goniometer.axis=0,0,0", "geometry.goniometer.axis=0,0,0: an axis of length 0 is not a direction"),
    ("geometry.detector.distance=-530", "geometry.detector.distance=-530 is not positive: give it in mm"),
    ("geometry.beam.wavelength=0", "geometry.beam.wavelength=0 is not positive: give it in Å"),
])
def test_a_geometry_override_dxtbx_would_assert_on_is_named(arg, said):
    """dxtbx stops on these with an internal assertion (DXTBX_ASSERT
    oscillation[1] >= 0.0, AssertionError), or, for a wavelength of 0, the
    lattice search with a division by zero: refused by validation with what
    works."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil
    from dials_gapfill.validate import validate

    params, _, images, _ = parse([arg, "/data/x_*.cbf"], master_phil())
    with pytest.raises(GapfillError) as info:
        validate(params, images)
    assert str(info.value).startswith(said), str(info.value)


@pytest.mark.slow
def test_an_experiment_list_from_dials_import(tiny_sweeps, tmp_path):
    """dials.process_gapped imported.expt, as DIALS' programs take it: the
    sequences dials.import made of a gapped file list are the blocks, with
    exclude_images on top; the log and JSON name the .expt as the input."""
    import glob

    gemmi = pytest.importorskip("gemmi", reason="gemmi is a test requirement")
    gapped = tiny_sweeps.make(omit=(10, 11), name="cli_expt")
    imported = run_cmd([tool("dials.import"), *sorted(glob.glob(os.path.join(gapped, "*.cbf"))),
                        "output.experiments=imported.expt"], cwd=str(tmp_path))
    assert imported.returncode == 0, imported.stderr
    out = str(tmp_path / "out")
    result = process(str(tmp_path / "imported.expt"), out, os.path.join(PHIL, "fast_preview.phil"),
                     "exclude_images=25:26")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    summary = _summary(out)
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == [(1, 9), (12, 24), (27, 40)]
    assert {e["image"]: e["by"] for e in summary["excluded_images"]} == {10: "input", 11: "input",
                                                                         25: "user", 26: "user"}
    assert f'images = "{tmp_path / "imported.expt"}"' in summary["parameters"]["modified"]
    batches = set(gemmi.read_mtz_file(os.path.join(out, "integrated.mtz")).column_with_label("BATCH"))
    assert batches <= set(range(1, 10)) | set(range(12, 25)) | set(range(27, 41)) and len(batches) > 30
