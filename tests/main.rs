//! clipa's integration tests, one binary. Each module drives the real
//! `clipa` binary or the public crates on tiny inputs.

mod backends; // cross-backend parity: wgpu against cpu, outputs and gradients
mod benchmark_layout; // clip_benchmark's wds layout in `clipa eval`: Fashion-MNIST folder vs wds, retrieval, class names by name
mod cli; // the binary: help, version, exit codes, `backends`, `check`
mod common; // shared helpers: running the binary, GPU-or-skip policy
mod data; // bad data on disk: skipped, counted and reported by `clipa train`
mod distributed; // `clipa train --devices`: the data-parallel path through the binary, device-list errors
mod eval; // `clipa eval` json on cpu and wgpu, `clipa classify`, Fashion-MNIST end to end
mod hub; // released CLIPA models: hub folders, pickles (and malicious ones), embed and tokenize against OpenCLIP
mod interop; // import-openclip / export-openclip / embed / models through the binary
mod nodes; // across machines: two `clipa train` processes over loopback equal one on four devices, a killed node ends the other, both resume
mod parity; // OpenCLIP fixtures: features, logits, activations, loss, gradients
mod presets; // every training preset takes a step with its own tokenizer; `clipa plan`'s command starts
mod reliability; // the run folder's lock, damaged checkpoints, values out of range, closed or full stdout
mod scaling; // `clipa sweep` (resume, csv, figures) and `clipa plan` (the paper's budgets)
mod search; // `clipa search` by text and by image against a brute-force top-k, its one-line errors
mod tensorboard; // `--report-to tensorboard`: event files read back by TensorBoard's reader, equal to metrics.jsonl
mod train; // `clipa train`/`eval`: run folder, kill-and-resume, one-line errors
mod workflows; // OpenCLIP workflows: --init-from a checkpoint or hub folder, LiT locking on Fashion-MNIST, optimiser flags
