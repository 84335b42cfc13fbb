"""The two APIs in front of a tower-pair server, each as conversion (pure functions of messages) and
transport (the service), over one set of plain request/response types and one error classifier.

    api_types        GenerateRequest / GenerateDelta / ScoreRequest / ModelInfo, the ServerClient protocol
    errors           exception -> status kind (gRPC code, HTTP status), shared by both APIs
    health           the one health probe of a ServerClient
    grpc_convert     protobuf <-> api_types          grpc_service     twotower.v1 + grpc.health.v1
    openai_protocol  OpenAI JSON <-> api_types       openai_app       FastAPI routes, SSE, fan-out

Imports the engine's plain types only; no Ray (a ServerClient is anything with its methods).
"""
