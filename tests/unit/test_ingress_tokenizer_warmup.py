"""The ingress loads its tokenizer when it starts, not in the first request's TTFT (router/ingress.py).

`_warm_tokenizer` runs as a task from the ingress's __init__: once the decoder answers with its model info, the
tokenizer is built in a thread. A request that arrives meanwhile waits for that task in `_model_info` rather than load
a second tokenizer; if the warm-up fails (no decoder yet), the first request builds it as before. The methods run here
on a stand-in for the ingress (the replica itself is exercised by the e2e tests through Ray Serve).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cluster.contracts.model_info import ModelInfo
from model_workers.gemma3.tokenizer import Gemma3Tokenizer
from router.ingress import G3ServeIngress


class _Decoder:
    """A decoder handle whose model_info answers after `release` is set; counts the calls."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail, self.release = 0, fail, asyncio.Event()
        self.model_info = SimpleNamespace(remote=self._remote)

    async def _remote(self) -> ModelInfo:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError("no decoder replica yet")
        return ModelInfo("m", 256, 16, 262144, 16, num_global_layers=1, num_local_layers=1, mm_tokens_per_image=8)


def _ingress(ckpt, decoder: _Decoder) -> SimpleNamespace:
    ing = SimpleNamespace(_checkpoint=ckpt, _decoder=decoder, _info=None, _tokenizer=None)
    ing._model_info = lambda: G3ServeIngress._model_info(ing)
    ing._get_tokenizer = lambda info: G3ServeIngress._get_tokenizer(ing, info)
    return ing


def test_the_tokenizer_is_loaded_before_the_first_request(tiny_text_ckpt):
    async def run():
        ing = _ingress(tiny_text_ckpt, _Decoder())
        ing._warming = asyncio.create_task(G3ServeIngress._warm_tokenizer(ing))
        await asyncio.sleep(0)
        assert ing._tokenizer is None and not ing._warming.done()  # waiting for the decoder's model info
        # A request arriving now waits for the warm-up instead of loading a tokenizer of its own.
        request = asyncio.create_task(ing._model_info())
        ing._decoder.release.set()
        info = await request
        assert ing._warming.done() and isinstance(ing._tokenizer, Gemma3Tokenizer)
        assert ing._get_tokenizer(info) is ing._tokenizer and ing._tokenizer.mm_tokens_per_image == 8
        assert info.mm_tokens_per_image == 8  # the decoder's answer, which the tokenizer was built with

    asyncio.run(run())


def test_a_failed_warm_up_leaves_the_tokenizer_to_the_first_request(tiny_text_ckpt):
    async def run():
        ing = _ingress(tiny_text_ckpt, _Decoder(fail=True))
        ing._decoder.release.set()
        ing._warming = asyncio.create_task(G3ServeIngress._warm_tokenizer(ing))
        await ing._warming  # no exception escapes the task
        assert ing._tokenizer is None
        ing._decoder.fail = False
        info = await ing._model_info()
        assert isinstance(ing._get_tokenizer(info), Gemma3Tokenizer)

    asyncio.run(run())
