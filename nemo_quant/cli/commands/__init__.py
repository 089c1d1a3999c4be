"""One module per `nemo-quant` command."""
from nemo_quant.cli.commands.eval import run_eval
from nemo_quant.cli.commands.export import run_export
from nemo_quant.cli.commands.prune import run_prune
from nemo_quant.cli.commands.ptq import run_ptq
from nemo_quant.cli.commands.train import run_train

COMMANDS = {"eval": run_eval, "ptq": run_ptq, "train": run_train, "export": run_export, "prune": run_prune}
