"""Model files, one module per format, read into (and written from) the models of helpers.model and
helpers.generic. Floor "formats": these modules use only the ground (errors, files) and the
models; nothing here knows of tokenizers, data, inheritance or training.

- families: one weight-name table per native family (ours <-> Hugging Face <-> GGUF), assign_state;
- weights: a file opened, its tensors read one at a time into a model built on the meta device
  (all of them, some blocks, or one block at a time): loading costs one copy of what is read;
- hf: Hugging Face folders (config.json + safetensors or .bin), native or through transformers;
- gguf: llama.cpp's files, dequantized one tensor at a time;
- torch_files: torch.save checkpoints (ours with a JSON sidecar, nanoGPT's, the student project's);
- sources: where a source lives (an embedded parent, a path, a hub id) and which format it is.

helpers.checkpoint is the one face the rest of the package calls (load_model, save_checkpoint, export_hf).
"""
