"""wideep's engine: model config, DeepSeek-V3 model, checkpoint loader, runner, offline Engine and CLIs."""
