"""The engine core: requests in, streamed deltas out. Plain Python and torch, no Ray, gRPC or HTTP.

    params     SamplingParams (per request) and ModelLimits      config     EngineConfig
    request    Request, RequestOutput, Usage                     scheduler  admission, lane choice
    lanes      one class per decoding mode                       engine     the step loop
    async_engine  asyncio front                                  errors     what failed requests see
    executor   the seam to the towers (in-process twin)          runners    tower operations on lanes
    tokenizer  tokenizers, incremental detokenisation            loading    checkpoint -> engine

The decoding rule itself (unmasking, x0 prediction, sampling) lives below, in `twotower.decoding`.
"""
