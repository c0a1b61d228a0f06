-- Serializable single-key Range through the JSON gateway (key "bench/range/0042").
wrk.method = "POST"
wrk.path = "/v3/kv/range"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"key":"YmVuY2gvcmFuZ2UvMDA0Mg==","serializable":true}'
