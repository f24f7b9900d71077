-- wrk script: POST one CoNLL-like sentence to the adapter in the URL.
wrk.method = "POST"
wrk.body = '{"texts": ["EU rejects German call to boycott British lamb ."]}'
wrk.headers["Content-Type"] = "application/json"
