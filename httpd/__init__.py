"""A raw HTTP/1.1 server on httptools + uvloop: keep-alive, pipelining, chunked bodies,
Expect: 100-continue, HEAD, CORS preflight, limits, streaming responses. No web framework."""

from httpd.config import ServerConfig
from httpd.request import Request
from httpd.response import HttpError, Response, StreamingResponse, error_response, json_response, text_response
from httpd.router import Router, path_segment
from httpd.server import HttpServer

__all__ = ["HttpError", "HttpServer", "Request", "Response", "Router", "ServerConfig", "StreamingResponse",
           "error_response", "json_response", "path_segment", "text_response"]
