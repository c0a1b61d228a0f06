#!/usr/bin/env bash
# Regenerates Sources/EtcdLiteProto from Protos/*.proto.
# Needs protoc (Debian: protobuf-compiler) and the two plugins, which build from the package's own
# dependencies: swift build --product protoc-gen-swift && swift build --product protoc-gen-grpc-swift-2
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(swift build --show-bin-path)
for plugin in protoc-gen-swift protoc-gen-grpc-swift-2; do
  [ -x "$bin/$plugin" ] || swift build --product "$plugin"
done
out=Sources/EtcdLiteProto
rm -f "$out"/*.pb.swift "$out"/*.grpc.swift
protoc -I Protos \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --plugin=protoc-gen-grpc-swift-2="$bin/protoc-gen-grpc-swift-2" \
  --swift_out="$out" --swift_opt=Visibility=Public \
  --grpc-swift-2_out="$out" --grpc-swift-2_opt=Visibility=Public,Server=true,Client=true \
  Protos/kv.proto Protos/auth.proto Protos/rpc.proto
echo "generated into $out"
