//! A valid component that exports some other world; the host must refuse it as a policy.

wit_bindgen::generate!({
    path: "wit",
    world: "other",
});

struct Other;

impl exports::example::other::greeter::Guest for Other {
    fn greet(name: String) -> String {
        format!("hello {name}")
    }
}

export!(Other);
