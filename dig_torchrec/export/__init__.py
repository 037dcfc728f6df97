"""``dig export``: turn a training checkpoint into a serving bundle.

Modules: ``bundle`` (the format: manifest, hashes, verification), ``writer`` (the
export itself), ``workers`` (the W gloo ranks that reshard the model), ``cli``.

A bundle is what a serving job needs and nothing else (no optimizer state, no reader
position)::

    OUT/
      .metadata, __<r>_0.distcp   DCP checkpoint of the model only ("model.<fqn>" keys),
                                  resharded for --world-size W (W=1: one unsharded file)
      config.yaml                 the resolved DIGConfig (with the export's overrides)
      dataset_meta.json           DatasetMeta the tables were sized from
      dataset_fingerprint.json    the training data's fingerprint (eval/retrieve refuse another dataset)
      sharding_plan.json          table -> sharding type and ranks of the W-rank plan
      COMPLETE                    the checkpoints' completeness marker (checkpoint loaders accept it)
      sid_index/                  sid_table.parquet (item -> SID), inverted_index.parquet
                                  (SID -> items), prefixes.parquet, index.json
      manifest.json               format version, source checkpoint, step, library
                                  versions, and sha256 + size of every other file

The DCP folder is the same kind of checkpoint ``torch.distributed.checkpoint`` writes for
training, so ``dcp_to_torch_save(OUT, "model.pt")`` turns it into one ``torch.save`` file
and ``dig eval`` / ``dig retrieve`` load it in one process (DCP reshards any W to 1).

Resharding to W > 1 spawns W gloo processes on this machine: each builds the model on
``meta``, plans it for W ranks with the training planner, materialises it with
``DistributedModelParallel``, loads its slices of the checkpoint and saves them with
``dcp.save``. W = 1 loads the checkpoint into a plain (unsharded) model in this process.

The export is atomic: everything is written into ``.OUT.export-<pid>`` beside ``OUT`` and
renamed to ``OUT`` only after the manifest is written. Any failure (or Ctrl-C) removes
the temporary folder; a temporary folder left by a killed export is removed by the next
export into the same parent. An existing ``OUT`` is never overwritten.
"""

