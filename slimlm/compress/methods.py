"""Method registry: recipe `method` name -> the function that processes one block."""

from __future__ import annotations

from slimlm.compress.engine import BlockMethod
from slimlm.quant.awq import awq_block
from slimlm.quant.gptq import gptq_block
from slimlm.quant.rtn import rtn_block

METHOD_FUNCTIONS: dict[str, BlockMethod] = {"rtn": rtn_block, "gptq": gptq_block, "awq": awq_block}
