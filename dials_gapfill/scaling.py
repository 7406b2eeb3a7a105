"""Optional scaling stage: all blocks scaled together as one crystal, in process.

1. Symmetry: when indexing ran in P1 (no indexing.known_symmetry), the Laue
   group is found with DIALS' own dials.symmetry machinery (LaueGroupAnalysis
   on the minimum cell, then the systematic-absence check), called piece by
   piece because dials.command_line.symmetry.symmetry() writes files instead
   of returning its result.
2. Scaling: DIALS' ScalingAlgorithm (what dials.scale runs) on all blocks at
   once: one set of merged intensities, a scaling model per block (each block
   is a scan).
3. scaled.mtz (unmerged, DIALS' export_mtz with the scaled intensities, BATCH
   = image number) and merged.mtz (dials.merge's merge_data_to_mtz), and the
   merging statistics (overall / inner / outer shell) for the summary.
"""

from __future__ import annotations

import copy
import logging

from dials_gapfill.errors import GapfillError
from dials_gapfill.phil import defaults

logger = logging.getLogger("dials.process_gapped.scaling")


def determine_symmetry(experiments, reflections):
    """(experiments, reflections) reindexed into the best space group."""
    from dials.algorithms.symmetry.absences.run_absences_checks import (
        run_systematic_absences_checks,
    )
    from dials.algorithms.merging.merge import prepare_merged_reflection_table
    from dials.algorithms.symmetry.absences.laue_groups_info import (
        laue_groups as laue_groups_for_absence_analysis,
    )
    from dials.algorithms.symmetry.laue_group import LaueGroupAnalysis
    from dials.array_family import flex
    from dials.command_line import symmetry as sym
    from dials.util.filter_reflections import filtered_arrays_from_experiments_reflections

    p = defaults(sym.phil_scope)
    tables = [reflections.select(reflections["id"] == i) for i in range(len(experiments))]
    for i, t in enumerate(tables):
        for k in list(t.experiment_identifiers().keys()):
            del t.experiment_identifiers()[k]
        t["id"] = flex.int(len(t), i)
        t.experiment_identifiers()[i] = experiments[i].identifier
    cb_ops = sym.change_of_basis_ops_to_minimum_cell(
        experiments, p.lattice_symmetry_max_delta, p.relative_length_tolerance, p.absolute_angle_tolerance
    )
    tables = sym.eliminate_sys_absent(experiments, tables)
    experiments, tables = sym.apply_change_of_basis_ops(experiments, tables, cb_ops)
    subset = sym.get_subset_for_symmetry(experiments, tables, p.exclude_images)
    datasets = filtered_arrays_from_experiments_reflections(
        experiments, subset, outlier_rejection_after_filter=True, partiality_threshold=p.partiality_threshold
    )
    datasets = [ma.as_anomalous_array().merge_equivalents().array() for ma in datasets]
    result = LaueGroupAnalysis(
        datasets,
        normalisation=p.normalisation,
        d_min=p.d_min,
        min_i_mean_over_sigma_mean=p.min_i_mean_over_sigma_mean,
        lattice_symmetry_max_delta=p.lattice_symmetry_max_delta,
        relative_length_tolerance=p.relative_length_tolerance,
        absolute_angle_tolerance=p.absolute_angle_tolerance,
        best_monoclinic_beta=p.best_monoclinic_beta,
    )
    logger.info(str(result))
    cb_op = result.best_solution.subgroup["cb_op_inp_best"]
    best = result.best_solution.subgroup["best_subsym"].space_group().build_derived_acentric_group()
    experiments, tables = sym._reindex_experiments_reflections(experiments, tables, best, cb_op)
    laue = str(best.build_derived_patterson_group().info())
    if laue in laue_groups_for_absence_analysis:
        subset = sym.get_subset_for_symmetry(experiments, tables, p.exclude_images)
        joint = flex.reflection_table()
        for t in subset:
            joint.extend(t)
        d_min = result.intensities.resolution_range()[1]
        merged = prepare_merged_reflection_table(experiments, joint, d_min, partiality_threshold=p.partiality_threshold)
        run_systematic_absences_checks(
            experiments, merged, float(p.systematic_absences.significance_level),
            method=p.systematic_absences.method,
        )
    joint = flex.reflection_table()
    for t in tables:
        joint.extend(t)
    return experiments, joint, {
        "laue_group": laue,
        "space_group": str(experiments[0].crystal.get_space_group().info()),
        "cb_op": str(cb_op),
        "determined": True,
    }


def _scale_params(params):
    from dials.command_line.scale import phil_scope

    sp = defaults(phil_scope)
    sp.anomalous = params.scaling.anomalous
    if params.scaling.d_min:
        sp.cut_data.d_min = params.scaling.d_min
    sp.output.html = None
    sp.output.json = None
    sp.output.delete_integration_shoeboxes = True
    return sp


def _shell(stats, key):
    overall = getattr(stats.overall, key)
    return [overall, getattr(stats.bins[0], key), getattr(stats.bins[-1], key)]


def merging_summary(stats, anom=None) -> dict:
    """xia2-style numbers: overall, inner shell, outer shell."""
    keys = {
        "d_max": "d_max",
        "d_min": "d_min",
        "n_obs": "n_obs",
        "n_unique": "n_uniq",
        "completeness": "completeness",
        "multiplicity": "mean_redundancy",
        "i_over_sigma": "i_over_sigma_mean",
        "cc_half": "cc_one_half",
        "r_merge": "r_merge",
        "r_meas": "r_meas",
        "r_pim": "r_pim",
    }
    out = {name: _shell(stats, key) for name, key in keys.items()}
    out["completeness"] = [100 * v for v in out["completeness"]]
    out["shells"] = [
        {
            "d_max": b.d_max, "d_min": b.d_min, "n_obs": b.n_obs, "n_unique": b.n_uniq,
            "completeness": 100 * b.completeness, "multiplicity": b.mean_redundancy,
            "i_over_sigma": b.i_over_sigma_mean, "cc_half": b.cc_one_half,
            "r_merge": b.r_merge, "r_pim": b.r_pim,
        }
        for b in stats.bins
    ]
    if anom is not None:
        out["anomalous_completeness"] = [100 * v for v in _shell(anom, "anom_completeness")]
        out["anomalous_multiplicity"] = _shell(anom, "mean_redundancy")
    return out


def scale(experiments, reflections, params, report, outputs):
    """Scale, merge and (if outputs) write scaled.mtz and merged.mtz."""
    from dials.algorithms.scaling.algorithm import ScalingAlgorithm
    from dials.command_line.export import export_mtz
    from dials.command_line.export import phil_scope as export_phil
    from dials.command_line.merge import merge_data_to_mtz
    from dials.command_line.merge import phil_scope as merge_phil

    experiments = copy.deepcopy(experiments)
    reflections = copy.deepcopy(reflections)
    if "shoebox" in reflections:
        del reflections["shoebox"]
    symmetry = {
        "space_group": str(experiments[0].crystal.get_space_group().info()),
        "determined": False,
    }
    if experiments[0].crystal.get_space_group().type().number() == 1 and (
        params.indexing.known_symmetry.space_group is None
    ):
        logger.info("Determining the Laue group and space group (as dials.symmetry)")
        try:
            experiments, reflections, symmetry = determine_symmetry(experiments, reflections)
        except (ValueError, RuntimeError, AssertionError, IndexError) as e:
            report.warnings.append(f"symmetry determination failed ({e}); scaling in P1")
            logger.warning("Symmetry determination failed (%s); scaling in P 1", e)
    logger.info("Scaling %d block(s) in %s", len(experiments), symmetry["space_group"])
    sp = _scale_params(params)
    try:
        algorithm = ScalingAlgorithm(sp, experiments, [reflections])
        algorithm.run()
        stats, anom = algorithm.merging_statistics_result, algorithm.anom_merging_statistics_result
        experiments, joint = algorithm.finish()
    except (ValueError, RuntimeError, AssertionError) as e:
        raise GapfillError(
            f"scaling failed: {' '.join(str(e).split())[:200]}: run without scaling.run "
            "and scale integrated.expt/integrated.refl with dials.scale"
        ) from None
    summary = {"symmetry": symmetry, "blocks": len(experiments)}
    if stats is not None:
        summary.update(merging_summary(stats, anom if params.scaling.anomalous else None))
    report.scaling = summary

    if outputs is not None:
        for exp in experiments:  # (copies) BATCH = image number; blocks are separated by gaps
            exp.scan.set_batch_offset(0)
        ep = defaults(export_phil)
        ep.intensity = ["scale"]
        ep.mtz.partiality_threshold = sp.cut_data.partiality_cutoff
        if sp.cut_data.d_min:
            ep.mtz.d_min = sp.cut_data.d_min
        out = params.output

        def write_unmerged(path):
            ep.mtz.hklout = path
            export_mtz(ep, experiments, [joint])

        outputs.write(out.scaled_mtz, write_unmerged)
        report.files.append({"name": out.scaled_mtz, "kind": "scaled unmerged mtz"})
        mp = defaults(merge_phil)
        mp.assess_space_group = False
        mp.anomalous = params.scaling.anomalous
        mp.output.html = None
        mp.partiality_threshold = sp.cut_data.partiality_cutoff
        if sp.cut_data.d_min:
            mp.d_min = sp.cut_data.d_min
        mtz = merge_data_to_mtz(mp, experiments, [joint])
        outputs.write(out.merged_mtz, lambda path: mtz.write(path))
        n_merged = mtz.n_reflections()
        summary["merged_reflections"] = n_merged
        report.files.append({"name": out.merged_mtz, "kind": "merged mtz", "reflections": n_merged})
    return experiments, joint
