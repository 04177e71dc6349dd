"""`cxrllava serve`: an OpenAI-compatible HTTP API over the inference engine, and a web page for radiologists.

limits      what one request may hold, and the error every refusal raises
uploads     image bytes from data: URLs and uploads -> checked images the library decodes
requests    OpenAI chat requests and the answer endpoints' forms -> generation jobs
scheduler   jobs into the server's engine (its worker thread batches them), their text and end back as events
app         the Starlette application: routes, API key, server-sent events, the page
cli         the command
"""
