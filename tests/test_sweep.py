"""The sweeps of a run (dials_gapfill.model.sweep): image statuses, blocks,
exclusions, dropped blocks and MTZ batch offsets, on image sequences made
without files (dxtbx with check_format=False): no DIALS run, milliseconds."""

from __future__ import annotations

import pytest

import dials_gapfill  # noqa: F401  (sets up libtbx for the venv before dials imports)


def _sequence(template, first, last, goniometer=None):
    """An experiment of images first..last of `template` (no file read)."""
    from dxtbx.format.FormatCBFMiniPilatus import FormatCBFMiniPilatus
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import BeamFactory, DetectorFactory, GoniometerFactory, Scan
    from dxtbx.model.experiment_list import Experiment
    from scitbx.array_family import flex

    n = last - first + 1
    scan = Scan((first, last), (0.5 * (first - 1), 0.5), flex.double(n, 0.1), flex.double(range(n)), first - 1, True)
    beam = BeamFactory.simple(1.0)
    detector = DetectorFactory.simple("PAD", 100, (10, 10), "+x", "-y", (0.1, 0.1), (100, 100))
    goniometer = goniometer or GoniometerFactory.known_axis((1, 0, 0))
    imageset = ImageSetFactory.make_sequence(
        template, list(range(first, last + 1)), format_class=FormatCBFMiniPilatus, beam=beam,
        detector=detector, goniometer=goniometer, scan=scan, check_format=False,
    )
    return Experiment(imageset=imageset, beam=beam, detector=detector, goniometer=goniometer, scan=imageset.get_scan())


def _sweeps(*specs):
    """Sweeps from (template, [(first, last), ...] sequences, image range, statuses)."""
    from dials_gapfill.model.sweep import Sweep, Sweeps

    return Sweeps([
        Sweep(template, [_sequence(template, a, b) for a, b in ranges], image_range, statuses)
        for template, ranges, image_range, statuses in specs
    ])


def _blocks(sweeps):
    return [(sweeps.sweep_of(e).number, *e.scan.get_image_range()) for e in sweeps.experiments()]


def test_missing_files_make_blocks_and_are_named():
    from dials_gapfill.model.sweep import MISSING, NOT_GIVEN

    sweeps = _sweeps(("/d/x_####.cbf", [(1, 40), (46, 80)], (1, 80), {43: (NOT_GIVEN, "not given", "input")}))
    assert _blocks(sweeps) == [(1, 1, 40), (1, 46, 80)]
    missing = [d for d in sweeps.not_used() if d["status"] == MISSING]
    assert [d["image"] for d in missing] == [41, 42, 44, 45]
    assert [d["image"] for d in sweeps.not_used() if d["status"] == NOT_GIVEN] == [43]
    assert all(d["sweep"] == 1 and d["by"] == "input" for d in missing)
    # a block's image set is its own slice: dxtbx' batch offset = first image - 1
    assert [e.scan.get_batch_offset() for e in sweeps.experiments()] == [0, 45]
    assert sweeps.gap_before(sweeps.experiments()[1]) and sweeps.gap_after(sweeps.experiments()[0])
    assert not sweeps.gap_before(sweeps.experiments()[0]) and not sweeps.gap_after(sweeps.experiments()[1])


def test_exclusion_cuts_a_block_and_keeps_the_others_as_they_were():
    sweeps = _sweeps(("/d/x_####.cbf", [(1, 40)], (1, 40), None))
    experiments, _ = sweeps.exclude({(1, 10): "blank image", (1, 11): "blank image"}, "auto")
    assert _blocks(sweeps) == [(1, 1, 9), (1, 12, 40)]
    assert len(experiments) == 2
    bad = [d for d in sweeps.not_used()]
    assert [(d["image"], d["status"], d["reason"], d["by"]) for d in bad] == [
        (10, "bad", "blank image", "auto"), (11, "bad", "blank image", "auto")]
    # an image already not used is not excluded again; an unchanged block keeps its identity
    first = sweeps.experiments()[0].identifier
    sweeps.exclude({(1, 10): "other reason", (1, 30): "over-exposed"}, "auto")
    assert [d["reason"] for d in sweeps.not_used()] == ["blank image", "blank image", "over-exposed"]
    assert _blocks(sweeps) == [(1, 1, 9), (1, 12, 29), (1, 31, 40)]
    assert sweeps.experiments()[0].identifier == first


def test_short_blocks_are_dropped_with_their_reason(caplog):
    from dials_gapfill.errors import GapfillError

    sweeps = _sweeps(("/d/x_####.cbf", [(1, 40)], (1, 40), None))
    sweeps.exclude({(1, n): "bad" for n in (2, 4)}, "auto", min_block_images=2)
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("Dropping")] == \
        ["Dropping images 1-1", "Dropping images 3-3"]
    assert _blocks(sweeps) == [(1, 5, 40)]  # blocks 1 and 3 dropped
    dropped = sweeps.dropped_blocks
    assert [(d["sweep"], d["first"], d["last"]) for d in dropped] == [(1, 1, 1), (1, 3, 3)]
    assert all("shorter than gaps.min_block_images after exclusions" in d["reason"] for d in dropped)
    assert {d["image"]: d["status"] for d in sweeps.not_used()} == {1: "dropped", 2: "bad", 3: "dropped", 4: "bad"}
    with pytest.raises(GapfillError, match="no usable images left"):
        sweeps.exclude({(1, n): "bad" for n in range(5, 41)}, "auto")


def test_a_block_that_cannot_be_indexed_is_dropped_with_its_statistics():
    sweeps = _sweeps(("/d/x_####.cbf", [(1, 10), (20, 30)], (1, 30), None))
    second = sweeps.experiments()[1]
    sweeps.drop_block(second, "only 5% of its spots indexed", "block could not be indexed",
                      stats={"spots": 100, "indexed": 5})
    assert _blocks(sweeps) == [(1, 1, 10)]
    assert sweeps.dropped_blocks == [{"first": 20, "last": 30, "reason": "only 5% of its spots indexed",
                                      "stats": {"spots": 100, "indexed": 5}, "sweep": 1}]
    assert {d["reason"] for d in sweeps.not_used() if d["status"] == "dropped"} == {"block could not be indexed"}


def test_several_sweeps_name_images_and_number_batches_by_sweep():
    sweeps = _sweeps(
        ("/d/a_####.cbf", [(1, 15)], (1, 15), None),
        ("/d/b_####.cbf", [(1, 6), (8, 15)], (1, 15), None),
        ("/d/c_####.cbf", [(101, 150)], (101, 150), None),
    )
    assert _blocks(sweeps) == [(1, 1, 15), (2, 1, 6), (2, 8, 15), (3, 101, 150)]
    # the same image number in two sweeps: excluded in one only
    sweeps.exclude({(2, 3): "blank image"}, "auto")
    assert _blocks(sweeps)[:4] == [(1, 1, 15), (2, 1, 2), (2, 4, 6), (2, 8, 15)]
    assert sweeps.image_name((2, 3)) == "image 3 of sweep 2"
    assert sweeps.exclude_images_value((2, 3)) == "2:3:3"
    assert sweeps.images_name(2, 4, 6) == "images 4-6 of sweep 2"
    # DIALS' rule: ranges kept where they do not overlap, else the next hundred
    assert sweeps.batch_offsets() == {1: 0, 2: 200, 3: 0}
    # block identifiers: unique, and the same for the same input
    ids = [e.identifier for e in sweeps.experiments()]
    assert len(set(ids)) == len(ids)
    again = _sweeps(("/d/a_####.cbf", [(1, 15)], (1, 15), None))
    assert again.experiments()[0].identifier == ids[0]


def test_one_sweep_keeps_image_numbers_as_batches():
    sweeps = _sweeps(("/d/x_####.cbf", [(1, 40), (46, 80)], (1, 80), None))
    assert sweeps.batch_offsets() == {1: 0}
    assert sweeps.image_name((1, 12)) == "image 12" and sweeps.exclude_images_value((1, 12)) == "12"
    assert sweeps.images_name(1, 46, 80) == "images 46-80"


def test_a_block_never_spans_two_imported_sequences():
    """dxtbx ends a sequence where the header angles do not follow on (a
    duplicated frame): the block ends there too, even with no gap."""
    sweeps = _sweeps(("/d/x_####.cbf", [(1, 10), (11, 11), (12, 24)], (1, 24), None))
    assert _blocks(sweeps) == [(1, 1, 10), (1, 11, 11), (1, 12, 24)]
    sweeps.exclude({(1, 11): "duplicate frame"}, "auto")
    assert _blocks(sweeps) == [(1, 1, 10), (1, 12, 24)]


def test_dropping_a_block_keeps_the_other_blocks_spots_renumbered():
    """After indexing, a dropped block takes only its own spots: the other
    blocks keep their unindexed spots (the refined model may index them)
    and ``id`` and ``imageset_id`` both become positions in the blocks kept
    (DIALS maps centroids by ``imageset_id``)."""
    from dials.array_family import flex

    from dials_gapfill.model.tables import keep_blocks, keep_experiments, set_identifiers

    blocks = [_sequence("/x/s1_#####.cbf", 1, 10), _sequence("/x/s2_#####.cbf", 1, 2),
              _sequence("/x/s2_#####.cbf", 4, 15), _sequence("/x/s3_#####.cbf", 1, 15)]
    for k, e in enumerate(blocks):
        e.identifier = f"block-{k}"
    table = flex.reflection_table()
    # (block, indexed) for each spot
    spots = [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False), (2, False), (3, True)]
    table["imageset_id"] = flex.int([b for b, _ in spots])
    table["id"] = flex.int([b if ok else -1 for b, ok in spots])
    table["spot"] = flex.int(range(len(spots)))
    set_identifiers(table, blocks)
    kept = {"block-0", "block-2", "block-3"}
    out, experiments = keep_blocks(table, blocks, kept)
    assert [e.identifier for e in experiments] == ["block-0", "block-2", "block-3"]
    assert list(out["spot"]) == [0, 1, 4, 5, 6, 7]
    assert list(out["imageset_id"]) == [0, 0, 1, 1, 1, 2]
    assert list(out["id"]) == [0, -1, 1, -1, -1, 2]
    assert dict(out.experiment_identifiers()) == {0: "block-0", 1: "block-2", 2: "block-3"}
    # keep_experiments keeps the rows of an experiment's id (indexed ones),
    # with imageset_id renumbered as id
    out, _ = keep_experiments(table, blocks, kept)
    assert list(out["spot"]) == [0, 4, 7]
    assert list(out["id"]) == list(out["imageset_id"]) == [0, 1, 2]


def test_the_summary_lists_the_mtz_batches_each_sweep_has():
    """Batches of the blocks (image number + the sweep's offset), not the
    sweep's whole image range."""
    from dials_gapfill.model.state import Block, Report
    from dials_gapfill.report.summary import summary_text

    report = Report()
    report.sweeps = [{"number": s, "template": f"/d/x_{s}_#####.cbf", "image_range": [1, 15], "n_blocks": n,
                      "goniometer": "", "batch_offset": 100 * (s - 1)} for s, n in ((1, 1), (2, 2), (3, 1))]
    report.blocks = [Block(1, 1, 15, 0, 1.5, sweep=1), Block(2, 1, 5, 0, 0.5, sweep=2),
                     Block(3, 8, 15, 0.7, 1.5, sweep=2), Block(4, 3, 15, 0.2, 1.5, sweep=3)]
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip()
            for line in summary_text(report).splitlines() if "/d/x_" in line}
    assert rows == {"1": "1-15", "2": "101-105, 108-115", "3": "203-215"}
