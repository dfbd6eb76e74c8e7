"""Starter files of the sandbox templates.

Node project templates only write files; creating them needs no network, and
`install_packages` (or `npm install` in a `run_commands` entry) fetches the
dependencies that package.json lists.
"""

from __future__ import annotations

import json


def _package_json(name: str, scripts: dict[str, str], deps: dict[str, str]) -> str:
    body = {
        "name": name,
        "version": "0.1.0",
        "private": True,
        "scripts": scripts,
        "dependencies": deps,
    }
    return json.dumps(body, indent=2) + "\n"


TEMPLATE_FILES: dict[str, dict[str, str]] = {
    "base": {},
    "python": {},
    "claude-code": {},
    "node": {
        "package.json": _package_json("sandbox", {"start": "node index.js"}, {}),
        "index.js": "console.log('hello from the node template');\n",
    },
    "vanilla": {
        "package.json": _package_json("vanilla-app", {"start": "node server.js"}, {}),
        "index.html": (
            '<!doctype html>\n<html>\n<head><meta charset="utf-8">'
            '<title>App</title><link rel="stylesheet" href="style.css">'
            '</head>\n<body><div id="app"></div>'
            '<script src="main.js"></script></body>\n</html>\n'
        ),
        "main.js": "document.getElementById('app').textContent = 'Hello';\n",
        "style.css": "body { font-family: sans-serif; }\n",
        "server.js": (
            "const http = require('http');\nconst fs = require('fs');\n"
            "const path = require('path');\n"
            "http.createServer((req, res) => {\n"
            "  const file = req.url === '/' ? 'index.html' : req.url.slice(1);\n"
            "  fs.readFile(path.join(__dirname, file), (err, data) => {\n"
            "    res.writeHead(err ? 404 : 200);\n"
            "    res.end(err ? 'not found' : data);\n"
            "  });\n}).listen(process.env.PORT || 3000);\n"
        ),
    },
    "react": {
        "package.json": _package_json(
            "react-app",
            {"dev": "vite", "build": "vite build"},
            {"react": "^18.3.1", "react-dom": "^18.3.1", "vite": "^5.4.0"},
        ),
        "index.html": (
            '<!doctype html>\n<html>\n<body><div id="root"></div>'
            '<script type="module" src="/src/main.jsx"></script></body>\n</html>\n'
        ),
        "src/main.jsx": (
            "import React from 'react';\n"
            "import { createRoot } from 'react-dom/client';\n"
            "import App from './App.jsx';\n"
            "createRoot(document.getElementById('root')).render(<App />);\n"
        ),
        "src/App.jsx": "export default function App() {\n  return <h1>Hello</h1>;\n}\n",
    },
    "nextjs": {
        "package.json": _package_json(
            "next-app",
            {"dev": "next dev", "build": "next build", "start": "next start"},
            {"next": "^14.2.0", "react": "^18.3.1", "react-dom": "^18.3.1"},
        ),
        "next.config.js": "module.exports = {};\n",
        "app/layout.js": (
            "export default function RootLayout({ children }) {\n"
            "  return <html><body>{children}</body></html>;\n}\n"
        ),
        "app/page.js": (
            "export default function Page() {\n  return <h1>Hello</h1>;\n}\n"
        ),
    },
}
