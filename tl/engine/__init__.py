"""tl.engine: the machinery. Open it when a run must be exact, robust, fast or reported.

The core (tl/*.py) teaches transfer learning; this package makes a run of it
trustworthy. It imports the core, never the other way round. One job per file:

run
  run.py              the run as named steps: images, model and stages, restore, stage
                      setup, run folder, training stage by stage, finish
  stage_setup.py      one stage just before it trains: what trains, optimizer, schedule,
                      stored features or images, loaders
  options.py          RunOptions: every option of a run that is not the recipe's numbers
  run_folder.py       the run folder: config.json, history.csv, weight files and last.ckpt
                      after every epoch, the results at the end; one writer, its own checkpoints
  resume.py           the options a saved run continues with, the state it is restored to
  early_stopping.py   --patience: when training stops
  headline.py         the headline number, on images that played no part in choosing it
  distributed.py      several processes under torchrun: process group, shard samplers, DDP
  command.py          how every command ends: one error: line and exit 2, Ctrl-C exit 130 (SIGTERM
                      143), an interrupt never lost, even one Python swallowed
  progress.py         a bar on stderr for each long pass; --no-progress turns them off
data
  selection.py        the one function that chooses a run's images
  images.py           which files in a data folder are usable images
  image_cache.py      --image-cache / --device-images: every image decoded once
  feature_store.py    where the features of a frozen prefix are stored and checked
  bn_folding.py       BatchNorm folded into the convolution before it, for the feature pass
  prepare.py          where the data lives: --data, the download, --prepare dogs-vs-cats
  balance.py          unbalanced classes: class weights, a balanced sampler, the warning
  class_names.py      class names that print alike but differ in their Unicode form; a name
                      shown on one line (its line feeds and escapes as \\n, \\x1b)
files
  files.py            atomic writes; files that change together (a journal undoes a killed update); digests
  folders.py          the folders a command makes; a failed command leaves none of them empty
  folder_lock.py      one writer per folder: an exclusive lock that names its holder
  checkpoint.py       the state_dict and checkpoint formats, read with weights_only; a
                      state_dict loaded into a model, a misfit explained (load_into)
  tables.py           every CSV table: one writer (nothing a spreadsheet runs) and its reader
  schema.py           the bounds of every file a person may edit and the project reads back
model
  backbones.py        every --backbone name to its Backbone
  timm_backbones.py   a timm model read as a Backbone
  weights.py          pretrained weights (where from, what if absent) and build_model
  summary.py          the model summary a run prints: shapes, counts, what trains
  image_size.py       whether the network can take, and see, --image-size pixels
  device.py           the device and its mixed-precision settings
after training
  evaluate.py         scoring a saved model on a split (--evaluate)
  model_loading.py    rebuilding a saved model from its run's config.json
  predict.py          classifying photos without labels: single images and a folder
  metrics.py          the classification report
  plots.py            the pictures
  export.py           one self-describing ONNX / TorchScript file, checked (--export)
  explain.py          where the network looks, what it gets wrong (--explain)
  tta.py              test-time augmentation: a photo and its mirror averaged (--tta)
training extras
  ema.py              the average of the weights (--ema)
  lr_finder.py        the learning-rate range test (--find-lr)
  tensorboard.py      event files for TensorBoard (--tensorboard)
search
  tuning.py           the machinery of a search for a recipe's numbers (experiments/tune.py)
  trials.py           a trial's life in a shared study: its random stream, its process, a lost
                      trial failed and retried once, why a trial failed
"""
