"""Starting a job: the launcher behind pretrain_scripts/finetune_llama.sh (cli), the checks it
runs once before any rank starts (preflight), one rank of the job (entry) and what every rank
does at start and at exit (rank)."""
