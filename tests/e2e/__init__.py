"""End-to-end tests: whole runs of `recall-dist train` (under torchrun, `recall-dist torchrun` or in a gloo
group) and of `recall-dist demo --quick`, on CPU with real DeepSpeed / FSDP2; slow."""
