"""Launch templates, shipped inside the package as `orchestrator.templates` (see pyproject.toml):
the scripts each Slurm step runs (slurm_node.sh, slurm_task.sh)."""
