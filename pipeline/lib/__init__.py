"""The library the stages share: data, models, training, prediction, checkpoints, params, the run folders' layout."""
