"""Controlled pretraining experiments: place token sequences at chosen positions of the training stream.

    interval_set   IntervalSet: disjoint int64 intervals (treap; Python and C++ backends), collision-free placement
    insertion_map  InsertionMap / InsertionMapWriter: HDF5 map  sequence slot -> [(position, tokens)], sha256-checked
    build          build_insertion_map: JSONL texts/token lists -> random or explicit placements -> map
    dataset        PretrainData / InsertionBatchIterator: memmap tokens + seed+epoch order + insertions
                   (imports torch; import it from nanolab.insertion.dataset)
    experiment     ExperimentConfig (scripts/pretrain_experiment.py's YAML schema), validation, the dry-run plan,
                   the guarded run-folder delete, Poisoner (imports torch; import it from nanolab.insertion.experiment)
    runners        the eval and dynamic-control subprocesses of an experiment (nanolab.insertion.runners)
"""

from nanolab.insertion.build import BuildReport, InsertionSource, build_insertion_map, read_jsonl
from nanolab.insertion.insertion_map import InsertionMap, InsertionMapWriter
from nanolab.insertion.interval_set import IntervalSet, cpp_available

__all__ = ["BuildReport", "InsertionMap", "InsertionMapWriter", "InsertionSource", "IntervalSet",
           "build_insertion_map", "cpp_available", "read_jsonl"]
