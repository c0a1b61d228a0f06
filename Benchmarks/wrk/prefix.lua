-- Range over the 100 keys under "bench/range/" through the JSON gateway.
wrk.method = "POST"
wrk.path = "/v3/kv/range"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"key":"YmVuY2gvcmFuZ2Uv","range_end":"YmVuY2gvcmFuZ2Uw"}'
